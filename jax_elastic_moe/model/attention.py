"""Attention with a KV cache written at each token's position: GQA (Mixtral, Qwen, GLM-4.5, gpt-oss)
and MLA (DeepSeek-V3, caching the compressed latent; V3.2 adds its indexer's keys and attends only to
the tokens the indexer picks).

The cache of one layer is a dict of arrays with batch first and a fixed length L (positions 0..L-1).
Prefill and decode are the same code: new keys are written at `positions`, then every query attends
to the cache entries at positions <= its own (stale entries past a sequence's end are masked). A
sliding-window layer (gpt-oss) keeps a full-length cache and masks keys outside its window, so every
layer's cache has the same [B, L, ...] shape. `attend` (static) limits the attention to the first
`attend` positions: a first prefill chunk of C tokens (positions < C) attends to C keys, not to the
whole cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig, yarn_mscale
from .indexer import Indexer
from .layers import Linear, RMSNorm, apply_rope, normal, write_cache


def _mask(positions, cache_len: int, window: int | None):
    """[B, S, L] bool: query at position p sees keys at positions <= p (and > p - window)."""
    kpos = jnp.arange(cache_len)[None, None, :]
    qpos = positions[:, :, None]
    m = kpos <= qpos
    if window:
        m = m & (kpos > qpos - window)
    return m


def _softmax_scores(scores, mask, sinks=None):
    """Softmax over the last axis of the unmasked scores. `sinks` (broadcast to scores[..., :1]): a
    learned logit per head that joins every softmax and is then dropped (gpt-oss), so a query may
    give less than all of its attention to the keys."""
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sinks = jnp.broadcast_to(sinks.astype(jnp.float32), scores.shape[:-1] + (1,))
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
    e = jnp.exp(scores - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - top))


class GQAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, layer: int = 0):
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias, cfg=cfg, dtype=dtype, rngs=rngs)
        self.k = Linear(cfg.hidden_size, kvh * d, bias=cfg.qkv_bias, cfg=cfg, dtype=dtype, rngs=rngs)
        self.v = Linear(cfg.hidden_size, kvh * d, bias=cfg.qkv_bias, cfg=cfg, dtype=dtype, rngs=rngs)
        self.o = Linear(h * d, cfg.hidden_size, bias=cfg.o_bias, cfg=cfg, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.sinks = nnx.Param(normal(rngs, (h,), cfg.initializer_range, dtype)) if cfg.attn_sinks else None
        self.window = cfg.window(layer)

    @staticmethod
    def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype):
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, positions, cos, sin, cache, attend: int | None = None):
        cfg = self.cfg
        b, s, _ = x.shape
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.q(x).reshape(b, s, h, d)
        k = self.k(x).reshape(b, s, kvh, d)
        v = self.v(x).reshape(b, s, kvh, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = {"k": write_cache(cache["k"], k, positions), "v": write_cache(cache["v"], v, positions)}
        length = attend or cache["k"].shape[1]
        keys, values = cache["k"][:, :length], cache["v"][:, :length]
        qg = q.reshape(b, s, kvh, h // kvh, d)
        scores = jnp.einsum("bskgd,btkd->bkgst", qg, keys) * (d ** -0.5)
        sinks = None if self.sinks is None else self.sinks[...].reshape(1, kvh, h // kvh, 1, 1)
        probs = _softmax_scores(scores, _mask(positions, length, self.window)[:, None, None], sinks)
        out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(x.dtype), values).reshape(b, s, h * d)
        return self.o(out), cache


class MLAttention(nnx.Module):
    """Multi-head latent attention; the cache holds the normalised latent and the roped shared key."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, layer: int = 0):
        self.cfg = cfg
        h, hd = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.qkv_bias, cfg=cfg, dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b = Linear(cfg.q_lora_rank, h * hd, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)
            self.q = None
        else:
            self.q = Linear(cfg.hidden_size, h * hd, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)
        self.kv_a = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.qkv_bias,
                           cfg=cfg, dtype=dtype, rngs=rngs)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False,
                           cfg=cfg, dtype=dtype, rngs=rngs)
        self.o = Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=cfg.o_bias, cfg=cfg, dtype=dtype, rngs=rngs)
        scale = hd ** -0.5
        rs = cfg.rope_scaling_dict
        if rs and rs.get("mscale_all_dim"):
            scale *= yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"]) ** 2
        self.scale = scale
        self.indexer = Indexer(cfg, dtype, rngs) if cfg.index_topk else None

    @staticmethod
    def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype):
        cache = {"latent": jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
                 "k_rope": jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype)}
        if cfg.index_topk:
            cache["index_k"] = Indexer.empty_cache(cfg, batch, length, dtype)
        return cache

    def __call__(self, x, positions, cos, sin, cache, attend: int | None = None):
        cfg = self.cfg
        b, s, _ = x.shape
        h, nope, rope, vd = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_lora = None if self.q is not None else self.q_a_norm(self.q_a(x))
        q = self.q(x) if self.q is not None else self.q_b(q_lora)
        q = q.reshape(b, s, h, nope + rope)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        kv = self.kv_a(x)
        latent, k_rope = self.kv_a_norm(kv[..., :cfg.kv_lora_rank]), kv[..., cfg.kv_lora_rank:]
        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0, :]
        new_cache = {"latent": write_cache(cache["latent"], latent, positions),
                     "k_rope": write_cache(cache["k_rope"], k_rope, positions)}
        # the indexer picks among every cached position: no `attend` limit with it
        length = attend if attend and self.indexer is None else cache["latent"].shape[1]
        mask = _mask(positions, length, None)
        if self.indexer is not None:     # V3.2: attend only to the keys the indexer picks
            picked, new_cache["index_k"] = self.indexer(x, q_lora, positions, cos, sin, cache["index_k"], mask)
            mask = mask & picked
        cache = new_cache
        c = cfg.kv_lora_rank
        latents = cache["latent"][:, :length]
        rope_scores = jnp.einsum("bshd,btd->bhst", q_rope, cache["k_rope"][:, :length])
        # Per query row: absorbing kv_b into the query and the output costs L * h * 2c; expanding keys
        # and values for the L cached positions costs L * h * c * (nope + v) once plus L * h * (nope + v)
        # per query. Decode (and short chunks) absorb; long prefill chunks expand (a static choice).
        if s * 2 * c <= c * (nope + vd) + s * (nope + vd):
            w = self.kv_b.w[...].reshape(c, h, nope + vd)
            q_absorbed = jnp.einsum("bshd,chd->bshc", q_nope, w[..., :nope])
            scores = jnp.einsum("bshc,btc->bhst", q_absorbed, latents) + rope_scores
            probs = _softmax_scores(scores * self.scale, mask[:, None])
            out_latent = jnp.einsum("bhst,btc->bshc", probs.astype(x.dtype), latents)
            out = jnp.einsum("bshc,chd->bshd", out_latent, w[..., nope:])
        else:
            kv_full = self.kv_b(latents).reshape(b, length, h, nope + vd)
            scores = jnp.einsum("bshd,bthd->bhst", q_nope, kv_full[..., :nope]) + rope_scores
            probs = _softmax_scores(scores * self.scale, mask[:, None])
            out = jnp.einsum("bhst,bthd->bshd", probs.astype(x.dtype), kv_full[..., nope:])
        return self.o(out.reshape(b, s, h * vd)), cache
