"""Fault injection around a Transport, outside its data path: the engine's `fail_rank(how="drop" |
"slow")` and the transport tests use it; a plain `Transport` has none of it.

    drop     every send to another rank fails at once, blaming this rank (its peers see it silent);
    delay_s  the first send / recv / exchange of each seq sleeps this long first (a slow rank is late
             to start; its own deadline runs from then).

Both can change at run time (`set_fault`). `NativeExchange.sync_fault` copies them into the C++
exchange op, which applies them the same way.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from ..layout import check_seq
from .common import SendHandle
from .endpoint import Transport


class FaultInjectingTransport(Transport):
    """A `Transport` whose sends can be dropped and whose exchanges can be delayed on purpose.

    Args: those of `Transport`, and `drop` / `delay_s` (see `set_fault`)."""

    def __init__(self, *args, drop: bool = False, delay_s: float = 0.0, **kwargs):
        self._drop, self._delay_s, self._delayed_seq = False, 0.0, None
        self.set_fault(drop=drop, delay_s=delay_s)
        super().__init__(*args, **kwargs)

    @property
    def drop(self) -> bool:
        return self._drop

    @property
    def delay_s(self) -> float:
        return self._delay_s

    def set_fault(self, *, drop: bool | None = None, delay_s: float | None = None):
        """Change fault injection at run time (None leaves a setting unchanged)."""
        if drop is not None:
            if not isinstance(drop, bool):
                raise TypeError(f"drop must be a bool, got {type(drop).__name__}")
            self._drop = drop
        if delay_s is not None:
            if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or not 0 <= delay_s < 3600:
                raise ValueError(f"delay_s must be seconds in [0, 3600), got {delay_s!r}")
            self._delay_s = float(delay_s)

    def _maybe_delay(self, seq: int):
        if self._delay_s and self._delayed_seq != seq:
            self._delayed_seq = seq
            time.sleep(self._delay_s)

    def send(self, dest: int, arrays: Sequence[np.ndarray], seq: int) -> SendHandle:
        seq = check_seq(seq)
        dest = self._check_rank(dest, "dest")
        self._maybe_delay(seq)
        if self._drop and dest != self.rank:
            if dest not in self._peers:
                raise ValueError(f"no address installed for rank {dest}; call set_peers first")
            return SendHandle(dest, seq).fail(f"send dropped by fault injection (drop=True on rank {self.rank})",
                                              suspect=self.rank)
        return super().send(dest, arrays, seq)

    def recv(self, sources: Sequence[int], seq: int, deadline: float | None = None, copy: bool = False):
        self._maybe_delay(check_seq(seq))
        return super().recv(sources, seq, deadline, copy)

    def exchange(self, outgoing: Mapping[int, Sequence[np.ndarray]], seq: int, **kwargs):
        self._maybe_delay(check_seq(seq))   # before the deadline starts; `send` does not sleep again
        return super().exchange(outgoing, seq, **kwargs)
