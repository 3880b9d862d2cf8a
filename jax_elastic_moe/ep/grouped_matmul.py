"""The experts' grouped matmul: rows of x grouped by expert (group sizes), each group times its
expert's weight matrix.

    grouped_matmul(x [M, H], w [G, H, N], group_sizes [G]) -> [M, N]
    expert_mlp(grouped [M, H], group_sizes [G], w_gate, w_up, w_down) -> [M, H]   (SwiGLU)
    grouped_matmul_fp8(x [M, K], w [G, K, N] float8_e4m3fn, scale [G, K/bk, N/bn], group_sizes, block)

On Hopper GPUs (compute capability 9.x) with bfloat16/float16 operands this uses JAX's own Pallas
Mosaic GPU kernel, jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot: on an H200 at
DeepSeek-V3 expert shapes it ran at 597 and 482 TFLOP/s against 46 and 47 for jax.lax.ragged_dot.
Its tile sizes are chosen per shape from MGPU_CONFIGS, fastest first (the first one won a sweep on an
H200): a config must divide the shape, and is tried by compiling the kernel once for that shape
(a tile that does not fit shared memory raises there); the first that compiles is cached and used.
When none does, or on other GPUs, jax.lax.ragged_dot is used. On the CPU, the native kernel
jem_grouped_matmul (csrc/cpu/grouped_matmul.cc) is used where it is built: XLA:CPU lowers ragged_dot
to a dense matmul of every row with every group's matrix under a mask, so its cost grows with the
number of groups (expert slots per rank: a redundant slot would add compute for every token), while
the kernel's follows the rows actually routed.

Rows past sum(group_sizes): jax.lax.ragged_dot gives zeros there; the Mosaic kernel leaves them
unwritten, so with zero_tail=True (default) they are masked to zero. A caller that ignores those rows
(ungroup does: they are padding entries) can pass zero_tail=False and save a pass over the output.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ..kinds import Backend
from . import ffi
from .quant import dequantize_experts

log = logging.getLogger(__name__)

IMPLS = tuple(Backend)      # the one backend vocabulary (kinds.py); "jax" is jax.lax.ragged_dot

# Fastest first. The first is the winner of a sweep on an H200 at DeepSeek-V3 shapes.
MGPU_CONFIGS = (
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=5, grid_block_n=4),
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4),
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=3, grid_block_n=2),
    dict(block_m=128, block_n=64, block_k=64, max_concurrent_steps=4, grid_block_n=2),
    dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1),
    dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_block_n=1),
)
MGPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# (m, k, n, groups, dtype) -> [(config, reason)] of the configs rejected for that shape.
rejected: dict[tuple, list] = {}


def is_hopper(device=None) -> bool:
    """Whether `device` (default: the first of jax's default backend) is a compute capability 9.x GPU."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return False
    return str(getattr(device, "compute_capability", "")).startswith("9")


def config_fits(config: dict, k: int, n: int) -> bool:
    """Whether a tile config divides the contraction size k and the output width n."""
    return k % config["block_k"] == 0 and n % (config["block_n"] * config["grid_block_n"]) == 0


def first_working_config(configs, m, k, n, groups, dtype, probe):
    """The first config that fits (k, n) and for which probe(config, m, k, n, groups, dtype) raises
    nothing; None if there is none. Each rejection is logged and kept in `rejected`."""
    key = (m, k, n, groups, jnp.dtype(dtype).name)
    reasons = rejected.setdefault(key, [])
    for config in configs:
        if not config_fits(config, k, n):
            reasons.append((config, "does not divide the shape"))
            continue
        try:
            probe(config, m, k, n, groups, dtype)
        except Exception as e:  # a tile over shared memory raises ValueError; any failure rules it out
            reasons.append((config, f"{type(e).__name__}: {e}"))
            log.info("ragged_dot_mgpu config %s rejected for %s: %s", config, key, e)
            continue
        return config
    return None


def _mgpu_ragged_dot(x, w, group_sizes, config):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, **config)


def _compile_probe(config, m, k, n, groups, dtype):
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((groups, k, n), dtype),
            jax.ShapeDtypeStruct((groups,), jnp.int32))
    jax.jit(functools.partial(_mgpu_ragged_dot, config=config)).lower(*args).compile()


@functools.lru_cache(maxsize=None)
def choose_config(m: int, k: int, n: int, groups: int, dtype_name: str):
    """The Mosaic GPU tile config for this shape on this machine, or None (use jax.lax.ragged_dot).
    Compiles candidates, so call it once outside a hot loop (results are cached)."""
    return first_working_config(MGPU_CONFIGS, m, k, n, groups, jnp.dtype(dtype_name), _compile_probe)


def _use_mgpu(impl, x, w):
    if impl == Backend.JAX:
        return False
    ok = x.dtype == w.dtype and jnp.dtype(x.dtype) in MGPU_DTYPES and x.shape[0] > 0
    if impl == "mgpu":
        if not ok:
            raise ValueError(f"ragged_dot_mgpu needs equal bfloat16/float16 operands and M > 0, got "
                             f"{x.dtype} {x.shape} and {w.dtype} {w.shape}")
        return True
    return ok and is_hopper()


def impl_for_backend(backend: str) -> Backend:
    """The grouped-matmul impl of the EP ops' backend (kinds.EP_BACKENDS): "jax" keeps the experts'
    matmul pure JAX on the CPU too (ragged_dot); otherwise "auto" (the Mosaic kernel on Hopper)."""
    return Backend.JAX if backend == Backend.JAX and jax.default_backend() == "cpu" else Backend.AUTO


def _use_cpu_kernel(impl, x, w):
    if impl == "ffi":
        if not ffi.has_target("jem_grouped_matmul", "cpu") or jax.default_backend() != "cpu":
            raise RuntimeError("impl='ffi' needs the CPU backend and the built jem_grouped_matmul kernel; "
                               + (ffi.missing_reason("cpu") or "this build lacks it"))
        return True
    return (impl == "auto" and jax.default_backend() == "cpu" and ffi.has_target("jem_grouped_matmul", "cpu")
            and x.dtype == w.dtype and jnp.dtype(x.dtype) in ffi.FLOAT_DTYPES)


def grouped_matmul(x, w, group_sizes, *, zero_tail=True, impl="auto"):
    """x [M, K], w [G, K, N], group_sizes [G] int -> [M, N] in x's dtype: rows of group g (consecutive,
    groups in order) times w[g]. impl (a kinds.Backend): "auto" (the native CPU kernel on the CPU where
    built, the Mosaic GPU kernel on Hopper, else jax.lax.ragged_dot), "jax" (jax.lax.ragged_dot), "mgpu"
    (the Mosaic kernel, falling back to ragged_dot when no tile config works), or "ffi" (the CPU kernel,
    an error without it)."""
    impl = Backend.parse(impl, "impl")
    if jnp.ndim(x) != 2 or jnp.ndim(w) != 3 or jnp.ndim(group_sizes) != 1:
        raise ValueError(f"grouped_matmul: need x [M, K], w [G, K, N], group_sizes [G]; got shapes "
                         f"{jnp.shape(x)}, {jnp.shape(w)}, {jnp.shape(group_sizes)}")
    (m, k), (groups, k2, n) = x.shape, w.shape
    if k != k2 or group_sizes.shape[0] != groups:
        raise ValueError(f"grouped_matmul: shapes do not fit: x {x.shape}, w {w.shape}, "
                         f"group_sizes {group_sizes.shape}")
    group_sizes = group_sizes.astype(jnp.int32)
    if _use_cpu_kernel(impl, x, w):
        return ffi.grouped_matmul(x, w, group_sizes)
    if _use_mgpu(impl, x, w):
        config = choose_config(m, k, n, groups, jnp.dtype(x.dtype).name)
        if config is not None:
            out = _mgpu_ragged_dot(x, w, group_sizes, config)
            if zero_tail:
                used = jnp.arange(m, dtype=jnp.int32)[:, None] < group_sizes.sum()
                out = jnp.where(used, out, jnp.zeros((), out.dtype))
            return out
        log.warning("no ragged_dot_mgpu tile config works for M=%d K=%d N=%d G=%d %s; using "
                    "jax.lax.ragged_dot", m, k, n, groups, x.dtype)
    return jax.lax.ragged_dot(x, w, group_sizes)


def expert_mlp(grouped, group_sizes, w_gate, w_up, w_down, *, zero_tail=True, impl="auto"):
    """SwiGLU of each entry with its group's weights, as reference.expert_mlp: grouped [M, H],
    w_gate / w_up [S, H, I], w_down [S, I, H] -> [M, H]. With w_up=None, w_gate is the fused
    [S, H, 2I] gate-and-up weight (gate first): one wider matmul instead of two."""
    if w_up is None:
        gate_up = grouped_matmul(grouped, w_gate, group_sizes, zero_tail=False, impl=impl)
        g, u = jnp.split(gate_up, 2, axis=-1)
    else:
        g = grouped_matmul(grouped, w_gate, group_sizes, zero_tail=False, impl=impl)
        u = grouped_matmul(grouped, w_up, group_sizes, zero_tail=False, impl=impl)
    h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(grouped.dtype)
    return grouped_matmul(h, w_down, group_sizes, zero_tail=zero_tail, impl=impl)


def grouped_matmul_fp8(x, w, scale, group_sizes, block: tuple[int, int], *, zero_tail=True, impl="auto"):
    """As grouped_matmul with FP8 block-scaled weights: w [G, K, N] float8_e4m3fn, scale [G, ceil(K/bk),
    ceil(N/bn)] float32, block (bk, bn). On the CPU where built (impl "auto" or "ffi"), the native
    kernel dequantizes each weight tile as it packs it (jem_grouped_matmul_fp8); elsewhere the
    weights are dequantized to x's dtype in the step, then multiplied as grouped_matmul does."""
    impl = Backend.parse(impl, "impl")
    native = (jax.default_backend() == "cpu" and ffi.has_target("jem_grouped_matmul_fp8", "cpu")
              and jnp.dtype(x.dtype) in ffi.FLOAT_DTYPES)
    if impl == "ffi" and not native:
        raise RuntimeError("impl='ffi' needs the CPU backend and the built jem_grouped_matmul_fp8 kernel; "
                           + (ffi.missing_reason("cpu") or "this build lacks it"))
    if native and impl in ("auto", "ffi"):
        return ffi.grouped_matmul_fp8(x, w, scale, group_sizes, block)
    return grouped_matmul(x, dequantize_experts(w, scale, block, x.dtype), group_sizes, zero_tail=zero_tail,
                          impl=impl)
