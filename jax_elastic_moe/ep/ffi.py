"""XLA FFI backend of the EP ops: the native handlers of csrc/ registered with XLA, and wrappers with
the signatures and results of ep/reference.py (which defines the semantics; tests hold them equal).

Loading. At import this module registers the handlers of every native module that is built:
`jax_elastic_moe._ffi_cpu` for XLA platform "cpu" and `jax_elastic_moe._ffi_cuda` for "CUDA"
(pybind11 modules exposing PyCapsules). `load_library(path)` registers a plain
`libjem_ffi_{cpu,cuda}.so` instead, with ctypes: it has no Python ABI, so a library built here loads
on a machine with another Python (benchmarks/gpu_check.py). At import, the environment variables
JEM_FFI_CPU_LIBRARY / JEM_FFI_CUDA_LIBRARY name such libraries for platforms whose module is not
built. `available(platform)` says whether a platform's handlers are registered;
`missing_reason(platform)` says why not.

Scratch. CUDA handlers need int32 scratch (flags, scans, buckets). It is requested as one more
result of the custom call, so XLA owns it and the handlers stay capturable in command buffers (no
allocation inside a handler). The sizes mirror csrc/{dispatch,regroup,segment_sum}.h, which check
them. CPU handlers take the same buffers and ignore the scratch, so one target name serves both.
"""
from __future__ import annotations

import ctypes
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from . import reference

# XLA target name -> exported handler symbol without its platform suffix (csrc/*.h).
TARGETS = {
    "jem_dispatch": "JemDispatch",
    "jem_regroup": "JemRegroup",
    "jem_ungroup": "JemUngroup",
    "jem_combine": "JemCombine",
    "jem_grouped_matmul": "JemGroupedMatmul",     # CPU only (CUDA uses the Mosaic GPU ragged_dot)
    "jem_grouped_matmul_fp8": "JemGroupedMatmulFp8",   # CPU only: FP8 block-scaled weights
}
OPTIONAL = {"jem_grouped_matmul", "jem_grouped_matmul_fp8"}
_SUFFIX = {"cpu": "Cpu", "CUDA": "Cuda"}
_MODULES = {"cpu": "jax_elastic_moe._ffi_cpu", "CUDA": "jax_elastic_moe._ffi_cuda"}
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_loaded: dict[str, str] = {}   # XLA platform -> file its handlers came from
_missing: dict[str, str] = {}  # XLA platform -> why none are registered

_BUILD_HINT = ("build it with `pip install .` (or `pip install -e . --no-build-isolation`), "
               "or pass backend='jax'")


def xla_platform(platform: str) -> str:
    """'cpu' -> 'cpu'; 'gpu' / 'cuda' / 'CUDA' -> 'CUDA'; anything else is returned as given."""
    low = platform.lower()
    return {"cpu": "cpu", "gpu": "CUDA", "cuda": "CUDA"}.get(low, platform)


def available(platform: str | None = None) -> bool:
    """Whether the handlers of `platform` (default: jax's default backend) are registered."""
    return xla_platform(platform or jax.default_backend()) in _loaded


def missing_reason(platform: str | None = None) -> str:
    platform = xla_platform(platform or jax.default_backend())
    if platform in _loaded:
        return ""
    why = _missing.get(platform, f"no FFI kernels exist for platform {platform!r}")
    return f"jax_elastic_moe FFI kernels unavailable on {platform}: {why}; {_BUILD_HINT}"


def loaded_from(platform: str) -> str | None:
    """The file whose handlers serve `platform`, or None."""
    return _loaded.get(xla_platform(platform))


_targets: dict[str, set] = {}  # XLA platform -> the targets registered for it


def has_target(target: str, platform: str | None = None) -> bool:
    """Whether `target` (e.g. 'jem_grouped_matmul') is registered for `platform` (default: jax's)."""
    return target in _targets.get(xla_platform(platform or jax.default_backend()), ())


def _register(platform: str, capsules: dict, source: str) -> None:
    for target, symbol in TARGETS.items():
        if symbol not in capsules and target in OPTIONAL:
            continue
        jax.ffi.register_ffi_target(target, capsules[symbol], platform=platform)
        _targets.setdefault(platform, set()).add(target)
    _loaded[platform] = source
    _missing.pop(platform, None)


def _load_module(platform: str) -> None:
    try:
        module = importlib.import_module(_MODULES[platform])
        _register(platform, module.handlers(), module.__file__)
    except Exception as e:  # never fail the import: a missing or broken build means the reference is used
        _missing[platform] = f"module {_MODULES[platform]} could not be loaded ({type(e).__name__}: {e})"


def load_library(path, platform: str = "CUDA") -> None:
    """Registers the handlers of a plain libjem_ffi_{cpu,cuda}.so for `platform` ('cpu' or 'CUDA').

    A platform is registered once: loading a second library for it raises RuntimeError."""
    platform = xla_platform(platform)
    path = os.path.abspath(os.fspath(path))
    if platform in _loaded:
        if _loaded[platform] == path:
            return
        raise RuntimeError(f"FFI handlers for {platform} already registered from {_loaded[platform]}")
    lib = ctypes.CDLL(path)
    capsules = {sym: jax.ffi.pycapsule(getattr(lib, sym + _SUFFIX[platform])) for target, sym in TARGETS.items()
                if target not in OPTIONAL or hasattr(lib, sym + _SUFFIX[platform])}
    _register(platform, capsules, path)


LIBRARY_ENV = {"cpu": "JEM_FFI_CPU_LIBRARY", "CUDA": "JEM_FFI_CUDA_LIBRARY"}

for _platform in _MODULES:
    _load_module(_platform)
    if _platform not in _loaded and os.environ.get(LIBRARY_ENV[_platform]):
        try:
            load_library(os.environ[LIBRARY_ENV[_platform]], _platform)
        except Exception as _e:  # as above
            _missing[_platform] = (f"{LIBRARY_ENV[_platform]}={os.environ[LIBRARY_ENV[_platform]]} could not be "
                                   f"loaded ({type(_e).__name__}: {_e})")


# Scratch sizes in int32 elements; csrc/common.h, dispatch.h, regroup.h and segment_sum.h check them.
_SCAN_TILE = 2048
_REGROUP_TILE = 256


def _scan_scratch(n: int) -> int:
    return -(-n // _SCAN_TILE) + 1


def dispatch_scratch(num_ranks: int, num_tokens: int) -> int:
    return 2 * num_ranks * num_tokens + 1 + _scan_scratch(num_ranks * num_tokens)


def regroup_scratch(entries: int, slots_per_rank: int) -> int:
    cells = slots_per_rank * -(-entries // _REGROUP_TILE)
    return 2 * cells + 1 + _scan_scratch(cells)


def segment_scratch(entries: int, rows: int) -> int:
    return 2 * rows + 1 + entries + _scan_scratch(rows)


def _float(op: str, name: str, a) -> None:
    if jnp.dtype(a.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{op} (ffi): {name} must be float32, bfloat16 or float16, got {a.dtype}")


def _call(target: str, out_types, *args, **attrs):
    return jax.ffi.ffi_call(target, out_types)(*args, **attrs)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))


def dispatch(x, slots, weights, num_ranks, slots_per_rank, *, active=None):
    """As reference.dispatch: x [T, H], slots [T, K] int32, weights [T, K], active [N] or None ->
    (send_x [N, T, H], send_slot [N, T, K] int32, send_w [N, T, K], counts [N] int32, src_token [N, T] int32)."""
    t, h = x.shape
    k = slots.shape[1]
    n = int(num_ranks)
    live = jnp.ones((n,), jnp.int32) if active is None else jnp.asarray(active).astype(jnp.int32)
    i32 = jnp.int32
    outs = _call("jem_dispatch",
                 (_sds((n, t, h), x.dtype), _sds((n, t, k), i32), _sds((n, t, k), weights.dtype),
                  _sds((n,), i32), _sds((n, t), i32), _sds((dispatch_scratch(n, t),), i32)),
                 x, slots.astype(i32), weights, live, slots_per_rank=np.int64(slots_per_rank))
    return tuple(outs[:5])


def regroup(rows, row_slot, row_w, slots_per_rank):
    """As reference.regroup: rows [M0, H], row_slot [M0, K] int32, row_w [M0, K] ->
    (grouped [M, H], group_sizes [S] int32, entry_row [M] int32, entry_w [M]), M = M0 * min(K, S)."""
    m0, h = rows.shape
    k = row_slot.shape[1]
    s = int(slots_per_rank)
    m = m0 * min(k, s)
    i32 = jnp.int32
    outs = _call("jem_regroup",
                 (_sds((m, h), rows.dtype), _sds((s,), i32), _sds((m,), i32), _sds((m,), row_w.dtype),
                  _sds((regroup_scratch(m0 * k, s),), i32)),
                 rows, row_slot.astype(i32), row_w, slots_per_rank=np.int64(s))
    return tuple(outs[:4])


def ungroup(entry_out, entry_row, entry_w, num_rows):
    """As reference.ungroup: entry_out [M, H], entry_row [M] int32, entry_w [M] -> [num_rows, H]."""
    _float("ungroup", "entry_out", entry_out)
    _float("ungroup", "entry_w", entry_w)
    m, h = entry_out.shape
    r = int(num_rows)
    out, _ = _call("jem_ungroup",
                   (_sds((r, h), entry_out.dtype), _sds((segment_scratch(m, r),), jnp.int32)),
                   entry_out, entry_row.astype(jnp.int32), entry_w)
    return out


def combine(back, src_token, active, num_tokens, *, renormalize=False, send_w=None):
    """As reference.combine: back [N, C, H], src_token [N, C] int32, active [N] -> [num_tokens, H]."""
    _float("combine", "back", back)
    n, c, h = back.shape
    t = int(num_tokens)
    live = jnp.asarray(active).astype(jnp.int32)
    if renormalize:
        scale = reference.live_weight_scale(send_w, src_token, live, t)
    else:
        scale = jnp.zeros((0,), jnp.float32)
    out, _ = _call("jem_combine",
                   (_sds((t, h), back.dtype), _sds((segment_scratch(n * c, t),), jnp.int32)),
                   back, src_token.astype(jnp.int32), live, scale)
    return out


def grouped_matmul(x, w, group_sizes):
    """x [M, K], w [G, K, N] (dtype of x), group_sizes [G] int -> [M, N]: as jax.lax.ragged_dot, with
    work proportional to the rows inside groups (CPU; csrc/grouped_matmul.h)."""
    _float("grouped_matmul", "x", x)
    if w.dtype != x.dtype:
        raise TypeError(f"grouped_matmul (ffi): w has dtype {w.dtype}, x has {x.dtype}; they must match")
    return _call("jem_grouped_matmul", _sds((x.shape[0], w.shape[2]), x.dtype), x, w, group_sizes.astype(jnp.int32))


def grouped_matmul_fp8(x, w, scale, group_sizes, block: tuple[int, int]):
    """x [M, K] float, w [G, K, N] float8_e4m3fn, scale [G, ceil(K/bk), ceil(N/bn)] float32, block (bk, bn),
    group_sizes [G] int -> [M, N] in x's dtype: each weight tile dequantized by its block's scale inside
    the kernel (CPU; csrc/grouped_matmul.h)."""
    _float("grouped_matmul_fp8", "x", x)
    if w.dtype != jnp.float8_e4m3fn or scale.dtype != jnp.float32:
        raise TypeError(f"grouped_matmul_fp8 (ffi): w must be float8_e4m3fn and scale float32, got {w.dtype}, "
                        f"{scale.dtype}")
    return _call("jem_grouped_matmul_fp8", _sds((x.shape[0], w.shape[2]), x.dtype), x, w, scale,
                 group_sizes.astype(jnp.int32), block_k=np.int64(block[0]), block_n=np.int64(block[1]))
