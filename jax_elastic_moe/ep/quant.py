"""FP8 block-scaled weights (DeepSeek-V3/V3.2, GLM-4.5 FP8 checkpoints): the block-scale arithmetic the
experts' grouped matmul dequantizes with inside the step, and the loader at load time (model/quant.py
adds MXFP4). A weight float8_e4m3fn [rows, cols] with scales [ceil(rows / b0), ceil(cols / b1)]
float32: w = q * scale of its block."""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Scale grid of a [rows, cols] weight with blocks of block[0] rows x block[1] columns."""
    return (-(-rows // block[0]), -(-cols // block[1]))


def expand_scales(scale, rows: int, cols: int, block: tuple[int, int], xp=np):
    """[..., R, C] block scales -> [..., rows, cols]: each scale repeated over its block."""
    s = xp.repeat(xp.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return s[..., :rows, :cols]


def dequantize_fp8(q, scale_inv, block: tuple[int, int], xp=np):
    """q [..., rows, cols] float8_e4m3fn, scale_inv [..., ceil(rows/b0), ceil(cols/b1)] -> float32."""
    rows, cols = q.shape[-2:]
    return q.astype(xp.float32) * expand_scales(scale_inv.astype(xp.float32), rows, cols, block, xp)


def dequantize_experts(w, scale, block_in_out: tuple[int, int], dtype):
    """Inside the step: FP8 expert slots w [S, K, N] with scales [S, ceil(K/bk), ceil(N/bn)] -> dtype."""
    return dequantize_fp8(w, scale, block_in_out, jnp).astype(dtype)
