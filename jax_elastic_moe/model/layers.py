"""Small building blocks: linear, RMSNorm, LayerNorm, SwiGLU MLP and rotary embeddings (default and YaRN)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig, yarn_mscale


def normal(rngs: nnx.Rngs, shape, std: float, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """y = x @ w (+ b); w is stored [in, out] (the transpose of a torch Linear)."""

    def __init__(self, din: int, dout: int, *, bias: bool, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.w = nnx.Param(normal(rngs, (din, dout), cfg.initializer_range, dtype))
        self.b = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.w[...])
        return y + self.b[...] if self.b is not None else y


class RMSNorm(nnx.Module):
    """RMSNorm; `float32_scale` (gpt-oss) keeps the scale in float32 and applies it before the cast back."""

    def __init__(self, dim: int, eps: float, dtype, float32_scale: bool = False):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32 if float32_scale else dtype))
        self.eps = eps
        self.float32_scale = float32_scale

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.float32_scale:
            return (self.scale[...] * xf).astype(x.dtype)
        return self.scale[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32 (DeepSeek-V3.2's indexer keys)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.gate = Linear(hidden, inter, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)
        self.up = Linear(hidden, inter, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)
        self.down = Linear(inter, hidden, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def write_cache(cache, new, positions):
    """cache [B, L, ...], new [B, S, ...], positions [B, S] -> cache with new rows at positions."""
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, positions].set(new.astype(cache.dtype), mode="drop")


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim // 2] and the cos/sin scale (YaRN's attention factor)."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    pos_freqs = (base ** exponents).astype(np.float32)
    inv = (1.0 / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling_dict
    if not rs:
        return inv, 1.0
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    att = rs.get("attention_factor")
    if att is None:
        m, mall = rs.get("mscale"), rs.get("mscale_all_dim")
        att = yarn_mscale(factor, m) / yarn_mscale(factor, mall) if (m and mall) else yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + inv * extrap
    return inv.astype(np.float32), float(att)


def rope_cos_sin(positions, inv_freq, scale: float, dtype):
    """positions [B, S] -> cos, sin [B, S, rope_dim] (frequencies repeated over both halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x, cos, sin, interleave: bool = False):
    """x [B, S, heads, D]; cos/sin [B, S, R] with R <= D: the first R dims of each head rotate, the
    rest pass (GLM's partial rotary, V3.2's indexer). `interleave` reads (x0, x1), (x2, x3)... as the
    rotated pairs (DeepSeek) and returns them de-interleaved, as Hugging Face does."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :r], cos, sin, interleave), x[..., r:]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
