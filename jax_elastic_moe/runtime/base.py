"""The one interface both runtime modes implement, and what applying an epoch reports.

The engine's scheduler hands a runtime fixed-shape step batches (scheduler.Batch); the controller
hands it epochs. spmd (runtime/spmd.py): one process, a mesh of local devices; mooncake
(runtime/mooncake.py): one worker process per rank."""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import numpy as np

from ..placement import Placement
from .step import StepShape


@dataclasses.dataclass
class Applied:
    """What installing an epoch did: expert slots by source ("kept", "local", "peer", "backup"), the
    seconds spent compiling or loading programs, whether they were ready beforehand, and whether the
    survivors' KV caches were kept (False: every request must be prefilled again)."""
    moves: dict
    compile_s: float = 0.0
    precompiled: bool = False
    cache_kept: bool = True


class Runtime(Protocol):
    mode: str
    live: list[int]         # global ranks of the current epoch, in the order of a batch's rows

    def prepare(self, shapes: list[StepShape]) -> float:
        """Compiles the programs of these step shapes (before any step with deadlines); seconds."""

    def prefill(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """A prefill chunk: (next tokens [rows], expert counts [Lm, E]); raises RankFailure."""

    def decode(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """A decode step of every slot, as prefill."""

    def after_good_step(self, decide: Callable[[list[int]], Placement | None]):
        """Background work once serving is steady (spmd: programs for the next failures)."""

    def apply_epoch(self, active: np.ndarray, placement: Placement, dead: list[int], fresh=()) -> Applied:
        """Installs the controller's epoch: `dead` ranks out, `fresh` ranks (restarted, empty) in,
        `placement` (global numbering)."""

    def set_placement(self, active: np.ndarray, placement: Placement):
        """A new placement or active mask with the same live ranks: data only, nothing compiles."""

    def inject(self, rank: int, how: str, delay_s: float = 1.0):
        """Fault injection (kill, hang, slow, drop); a failure the next step finds."""

    def restart(self, rank: int):
        """A fresh process for a dead rank (mooncake); it takes slots at the next epoch."""

    def idle(self, busy: Callable[[], bool]):
        """The engine has nothing to run: housekeeping that must not run while serving."""

    def close(self):
        """Stops everything the runtime started."""
