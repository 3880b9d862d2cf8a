"""The engine's named choices, one vocabulary each: runtime mode, compute backend, failure kind.

str-valued enums: the plain strings stay accepted everywhere (`Engine(mode="spmd")`,
`ep_backend="ffi"`, `fail_rank(how="kill")`) and compare equal to the members; `parse` turns either
into a member, or raises a ValueError that lists the choices."""
from __future__ import annotations

import enum


class _Choice(str, enum.Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, what: str | None = None, allowed=None):
        """`value` (a member or its string) as a member of this enum, and of `allowed` when given."""
        allowed = tuple(cls) if allowed is None else tuple(allowed)
        try:
            member = cls(value)
        except ValueError:
            member = None
        if member is None or member not in allowed:
            names = ", ".join(repr(m.value) for m in allowed)
            raise ValueError(f"{what or cls.__name__.lower()} must be one of {names}, got {value!r}") from None
        return member


class Mode(_Choice):
    """How the ranks run: one process over local devices, or one worker process per rank."""
    SPMD = "spmd"           # runtime/spmd.py: one Mesh, jit + shard_map, XLA collectives
    MOONCAKE = "mooncake"   # runtime/mooncake.py + worker.py: Mooncake transfers between processes


class Backend(_Choice):
    """What computes the EP data path (dispatch, regroup, ungroup, combine) and the experts' grouped
    matmul. The EP ops take AUTO, JAX, FFI (`EP_BACKENDS`); the grouped matmul takes every member."""
    AUTO = "auto"   # the fastest correct one on jax's default platform
    JAX = "jax"     # pure JAX: the reference ops (ep/reference.py), jax.lax.ragged_dot
    FFI = "ffi"     # the native XLA FFI kernels of csrc/ (an error when they are not built)
    MGPU = "mgpu"   # grouped matmul only: JAX's Pallas Mosaic GPU ragged_dot (Hopper)


EP_BACKENDS = (Backend.AUTO, Backend.JAX, Backend.FFI)


class FailureKind(_Choice):
    """How `Engine.fail_rank` fails a rank (spmd: KILL only)."""
    KILL = "kill"   # the rank's process / device is gone
    HANG = "hang"   # the rank stops (SIGSTOP): caught by deadlines and heartbeat silence
    SLOW = "slow"   # the rank starts each exchange late (delay_s)
    DROP = "drop"   # every transfer the rank sends fails


SPMD_FAILURES = (FailureKind.KILL,)

__all__ = ["Backend", "EP_BACKENDS", "FailureKind", "Mode", "SPMD_FAILURES"]
