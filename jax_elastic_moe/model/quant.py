"""Quantized expert weights: FP8 block scales (DeepSeek-V3/V3.2, GLM-4.5 FP8 checkpoints) and MXFP4
(gpt-oss checkpoints, dequantized at load).

FP8 checkpoints store each linear weight as float8_e4m3fn [out, in] with weight_scale_inv
[ceil(out / bo), ceil(in / bi)] float32, (bo, bi) = weight_block_size: w = q * scale_inv of its block.
Here experts keep that FP8 payload in our [in, out] layout with the scales transposed to match,
[ceil(in / bi), ceil(out / bo)], and are dequantized in the expert computation."""
from __future__ import annotations

import numpy as np

# FP8 block-scale arithmetic lives with the experts' matmul that dequantizes in the step (ep/quant.py)
from ..ep.quant import FP8, dequantize_experts, dequantize_fp8, expand_scales, scale_shape  # noqa: F401

# MXFP4 code points (the low nibble is the first of a byte's two values), OCP MX spec
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """gpt-oss MXFP4 experts: blocks [E, N, G, 16] uint8 (two 4-bit codes a byte, low nibble first),
    scales [E, N, G] uint8 (power-of-two exponents biased by 127), 32 values a group ->
    float32 [E, G * 32, N] (the checkpoint's [out, in] rows read as our [in, out] layout)."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not fit scales {scales.shape}")
    vals = np.empty(blocks.shape[:-1] + (blocks.shape[-1] * 2,), np.float32)
    vals[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    vals[..., 1::2] = FP4_VALUES[blocks >> 4]
    vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    e, n = vals.shape[:2]
    return np.swapaxes(vals.reshape(e, n, -1), 1, 2)
