"""Counting XLA compilations: tests hold the engine to "placement and the active mask never recompile"
and "admission never compiles" with it."""
from __future__ import annotations

import jax


class CompileCounter:
    """Counts XLA backend compilations of this process from its creation on (`count`)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kw):
        if event == self.EVENT:
            self.count += 1
