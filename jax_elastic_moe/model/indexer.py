"""DeepSeek-V3.2's lightning indexer: for every query token, the top-k cached tokens its MLA attends to.

Arithmetic as transformers' DeepseekV32Indexer (and DeepSeek's reference without its FP8 scoring and
Hadamard rotation, which preserve dot products): per indexer head h,
    score[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t] / sqrt(D)),   w = weights_proj(x) / sqrt(H)
with q from the query latent (wq_b), k = LayerNorm(wk(x)), both roped (half-split, not interleaved)
on their first qk_rope_head_dim dims. Keys the query may not see score -inf; the top index_topk keys
(all of them when fewer) are picked. The indexer's keys are cached per layer as one more batch-first
array [B, L, index_head_dim] written at the tokens' positions, like the MLA latent."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .layers import LayerNorm, Linear, apply_rope, write_cache


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, nh * hd, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)
        self.wk = Linear(cfg.hidden_size, hd, bias=False, cfg=cfg, dtype=dtype, rngs=rngs)
        self.k_norm = LayerNorm(hd, 1e-6, dtype)
        # transformers keeps this projection in float32 whatever the model's dtype
        self.weights_proj = Linear(cfg.hidden_size, nh, bias=False, cfg=cfg, dtype=jnp.float32, rngs=rngs)

    @staticmethod
    def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype):
        return jnp.zeros((batch, length, cfg.index_head_dim), dtype)

    def __call__(self, x, q_latent, positions, cos, sin, keys, mask):
        """x [B, S, H]; q_latent [B, S, q_lora_rank]; cos/sin [B, S, qk_rope_head_dim]; keys: the
        layer's cached indexer keys [B, L, D]; mask [B, S, L] bool: the keys each query may see.
        Returns (picked [B, S, L] bool, keys with this step's keys written at `positions`)."""
        cfg = self.cfg
        b, s, _ = x.shape
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        q = apply_rope(self.wq_b(q_latent).reshape(b, s, nh, hd), cos, sin)
        k = apply_rope(self.k_norm(self.wk(x))[:, :, None, :], cos, sin)[:, :, 0, :]
        keys = write_cache(keys, k, positions)
        dots = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), keys.astype(jnp.float32)) * (hd ** -0.5)
        w = self.weights_proj(x.astype(jnp.float32)) * (nh ** -0.5)
        score = jnp.einsum("bsh,bsht->bst", w, jax.nn.relu(dots))
        score = jnp.where(mask, score, -jnp.inf)
        length = keys.shape[1]
        _, top = jax.lax.top_k(score, min(cfg.index_topk, length))
        picked = jnp.zeros((b, s, length), bool).at[
            jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], top].set(True)
        return picked, keys
