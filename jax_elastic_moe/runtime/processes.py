"""Linux process facts the controller reads about its local workers."""
from __future__ import annotations


def stat_fields(stat_path: str) -> list[str] | None:
    """The fields of a Linux /proc/<pid>[/task/<tid>]/stat file after the command name (state,
    parent pid, ...); None when it cannot be read (no such process, not Linux)."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_state(stat_path: str) -> str | None:
    """The state letter of a stat file ("R", "S", "T", ...); None when it cannot be read."""
    fields = stat_fields(stat_path)
    return fields[0] if fields else None
