"""The EP data-path ops with a backend switch: the engine's MoE layer calls these.

    dispatch(x, slots, weights, num_ranks, slots_per_rank, *, active=None, backend="auto")
    regroup(rows, row_slot, row_w, slots_per_rank, *, backend="auto")
    ungroup(entry_out, entry_row, entry_w, num_rows, *, backend="auto")
    combine(back, src_token, active, num_tokens, *, renormalize=False, send_w=None, backend="auto")

Signatures, shapes and results are those of ep/reference.py (which defines them exactly);
`backend` picks the implementation:
  "jax"   the pure-JAX reference (XLA sorts and scatters);
  "ffi"   the native XLA FFI kernels of csrc/ (ep/ffi.py); a RuntimeError says how to build them
          when they are missing for the platform;
  "auto"  the fastest correct backend of jax's default platform: "ffi" where its kernels are
          loaded (CPU, CUDA) and the dtypes are ones they take, else "jax" (with a one-time
          warning when the kernels are missing).

The "weighted sum over top-k" of a token is split in two on purpose: `ungroup` applies the top-k
weights on the expert side (per received row, the weighted sum of its entries), so only one row per
(token, destination rank) crosses the network back; `combine` then sums a token's returned rows over
the destination ranks, skipping ranks that are inactive, and with renormalize=True rescales the sum
so the weights of the live entries add up to one.

Bad input (ranks, shapes, dtypes that do not fit together) raises ValueError / TypeError here, for
both backends, before anything is traced into a kernel.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from ..kinds import EP_BACKENDS, Backend
from . import ffi, reference

BACKENDS = EP_BACKENDS          # kinds.Backend members the EP ops take
_warned: set[str] = set()


def resolve_backend(backend: str = "auto", *, dtypes=(), platform: str | None = None) -> Backend:
    """Backend.JAX or Backend.FFI: what `backend` (a member of BACKENDS or its string) means on
    `platform` (default: jax's default backend) for float operands of `dtypes`."""
    backend = Backend.parse(backend, "backend", BACKENDS)
    if backend == Backend.JAX:
        return Backend.JAX
    platform = platform or jax.default_backend()
    if backend == Backend.FFI:
        if not ffi.available(platform):
            raise RuntimeError(ffi.missing_reason(platform))
        return Backend.FFI
    if not ffi.available(platform):
        if platform not in _warned:
            _warned.add(platform)
            warnings.warn(ffi.missing_reason(platform) + "; using the pure-JAX reference", RuntimeWarning,
                          stacklevel=4)  # the caller of ops.<op>
        return Backend.JAX
    if any(jnp.dtype(d) not in ffi.FLOAT_DTYPES for d in dtypes):
        return Backend.JAX
    return Backend.FFI


def _impl(backend, dtypes=()):
    return ffi if resolve_backend(backend, dtypes=dtypes) == Backend.FFI else reference


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _rank(op, name, a, rank):
    if jnp.ndim(a) != rank:
        _fail(op, f"{name} must have rank {rank}, got shape {jnp.shape(a)}")


def _same_shape(op, name, a, shape):
    if tuple(jnp.shape(a)) != tuple(shape):
        _fail(op, f"{name} has shape {tuple(jnp.shape(a))}, expected {tuple(shape)}")


def _integer(op, name, a):
    dtype = jnp.result_type(a)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{op}: {name} must be an integer array, got dtype {dtype}")


def _positive(op, name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        _fail(op, f"{name} must be a positive Python int (static), got {v!r}")


def _non_negative(op, name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        _fail(op, f"{name} must be a non-negative Python int (static), got {v!r}")


def _check_rows_with_slots(op, rows_name, rows, slots_name, slots, w_name, w, slots_per_rank):
    """rows [R, H], slots [R, K] integer, w [R, K], slots_per_rank a positive int."""
    _rank(op, rows_name, rows, 2)
    _rank(op, slots_name, slots, 2)
    _integer(op, slots_name, slots)
    _same_shape(op, slots_name, slots, (rows.shape[0], slots.shape[1]))
    _same_shape(op, w_name, w, slots.shape)
    _positive(op, "slots_per_rank", slots_per_rank)


def dispatch(x, slots, weights, num_ranks, slots_per_rank, *, active=None, backend="auto"):
    """Groups token rows by destination rank (reference.dispatch).

    x [T, H]; slots [T, K] int global slots (-1 none); weights [T, K]; active [N] int 0/1 or None.
    Returns (send_x [N, T, H], send_slot [N, T, K] int32, send_w [N, T, K], counts [N] int32,
    src_token [N, T] int32)."""
    op = "dispatch"
    _check_rows_with_slots(op, "x", x, "slots", slots, "weights", weights, slots_per_rank)
    _positive(op, "num_ranks", num_ranks)
    if active is not None:
        _integer(op, "active", active)
        _same_shape(op, "active", active, (num_ranks,))
    return _impl(backend).dispatch(x, slots, weights, num_ranks, slots_per_rank, active=active)


def regroup(rows, row_slot, row_w, slots_per_rank, *, backend="auto"):
    """Expands received rows into (row, local slot) entries sorted by slot (reference.regroup).

    rows [M0, H]; row_slot [M0, K] int local slot or -1; row_w [M0, K].
    Returns (grouped [M, H], group_sizes [S] int32, entry_row [M] int32, entry_w [M]),
    M = M0 * min(K, S)."""
    _check_rows_with_slots("regroup", "rows", rows, "row_slot", row_slot, "row_w", row_w, slots_per_rank)
    return _impl(backend).regroup(rows, row_slot, row_w, slots_per_rank)


def ungroup(entry_out, entry_row, entry_w, num_rows, *, backend="auto"):
    """Per row, the weighted sum of its entries' outputs (reference.ungroup).

    entry_out [M, H]; entry_row [M] int (-1 pad); entry_w [M]. Returns [num_rows, H] (float32 sum)."""
    op = "ungroup"
    _rank(op, "entry_out", entry_out, 2)
    _integer(op, "entry_row", entry_row)
    _same_shape(op, "entry_row", entry_row, entry_out.shape[:1])
    _same_shape(op, "entry_w", entry_w, entry_out.shape[:1])
    _non_negative(op, "num_rows", num_rows)
    impl = _impl(backend, dtypes=(entry_out.dtype, entry_w.dtype))
    return impl.ungroup(entry_out, entry_row, entry_w, num_rows)


def combine(back, src_token, active, num_tokens, *, renormalize=False, send_w=None, backend="auto"):
    """Per token, the sum of its returned rows over active destination ranks (reference.combine).

    back [N, C, H]; src_token [N, C] int (-1 pad); active [N] int 0/1; renormalize needs
    send_w [N, C, K] (dispatch's weights). Returns [num_tokens, H] (float32 sum)."""
    op = "combine"
    _rank(op, "back", back, 3)
    _integer(op, "src_token", src_token)
    _same_shape(op, "src_token", src_token, back.shape[:2])
    _integer(op, "active", active)
    _same_shape(op, "active", active, back.shape[:1])
    _non_negative(op, "num_tokens", num_tokens)
    if renormalize:
        if send_w is None:
            _fail(op, "renormalize=True needs send_w, the [N, C, K] weights returned by dispatch")
        _rank(op, "send_w", send_w, 3)
        _same_shape(op, "send_w", send_w, back.shape[:2] + send_w.shape[2:])
    impl = _impl(backend, dtypes=(back.dtype,))
    return impl.combine(back, src_token, active, num_tokens, renormalize=renormalize, send_w=send_w)


choose_slots = reference.choose_slots

__all__ = ["BACKENDS", "resolve_backend", "dispatch", "regroup", "ungroup", "combine", "choose_slots"]
