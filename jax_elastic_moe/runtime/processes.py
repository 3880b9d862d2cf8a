"""Linux process facts the controller reads about its local workers."""
from __future__ import annotations


def proc_state(stat_path: str) -> str | None:
    """The state letter of a Linux /proc/<pid>[/task/<tid>]/stat file ("R", "S", "T", ...); None when
    it cannot be read (no such process, not Linux)."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
