"""The decoder of every family: embeddings, a stack of (attention, dense MLP or MoE) layers, final norm, LM head."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .attention import GQAttention, MLAttention
from .layers import MLP, Linear, RMSNorm, normal, rope_cos_sin, rope_inv_freq
from .moe import EPContext, MoEBlock


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, num_slots: int, dtype, rngs: nnx.Rngs):
        f32 = cfg.model_type == "gpt_oss"      # transformers keeps gpt-oss's norms in float32
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, f32)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, f32)
        self.attn = (MLAttention if cfg.attention == "mla" else GQAttention)(cfg, dtype, rngs, layer)
        self.is_moe = cfg.moe_layers[layer]
        self.mlp = (MoEBlock(cfg, num_slots, dtype, rngs) if self.is_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, cfg, dtype, rngs))


def _joined(xs: list):
    """[B_g, S_g, H] per group -> [1, sum B_g S_g, H] (one group: itself)."""
    if len(xs) == 1:
        return xs[0]
    return jnp.concatenate([x.reshape(1, -1, x.shape[-1]) for x in xs], axis=1)


def _split(y, like: list) -> list:
    """The inverse of _joined: y back into the groups' shapes."""
    if len(like) == 1:
        return [y]
    sizes = [x.shape[0] * x.shape[1] for x in like]
    parts = jnp.split(y.reshape(-1, y.shape[-1]), list(itertools.accumulate(sizes))[:-1])
    return [p.reshape(x.shape) for p, x in zip(parts, like)]


class MoEModel(nnx.Module):
    """A causal MoE language model of any supported family (see ModelConfig).

    `num_slots` physical expert slots per MoE layer; __call__ runs on one rank's share of the batch
    inside shard_map (or alone on one device) and exchanges tokens with the other ranks."""

    def __init__(self, cfg: ModelConfig, num_slots: int, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Param(normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.initializer_range, dtype))
        self.layers = nnx.List([DecoderLayer(cfg, i, num_slots, dtype, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.model_type == "gpt_oss")
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, cfg=cfg, dtype=dtype, rngs=rngs))

    def empty_cache(self, batch: int, length: int):
        attn = MLAttention if self.cfg.attention == "mla" else GQAttention
        return [attn.empty_cache(self.cfg, batch, length, self.dtype) for _ in range(self.cfg.num_layers)]

    def __call__(self, tokens, positions, cache, ctx: EPContext, attend: int | None = None):
        """tokens, positions [B, S] int32; cache: list of per-layer dicts; attend (static): attention
        over the first `attend` cache positions only (default all).
        Returns (hidden [B, S, H] after the final norm, new cache, expert counts [Lm, E] int32)."""
        [(hidden, cache)], counts = self.groups([(tokens, positions, cache, attend)], ctx)
        return hidden, cache, counts

    def groups(self, groups: list, ctx: EPContext):
        """Several row groups of different shapes in one pass: groups = [(tokens [B, S], positions,
        cache, attend)]. Each group attends over its own cache; the dense MLPs and the MoE layers run
        once on every group's tokens together (one exchange per MoE layer; ctx.valid and
        ctx.token_index cover the groups' flattened tokens in order).
        Returns ([(hidden, new cache)] per group, expert counts [Lm, E] int32)."""
        inv_freq, rope_scale = rope_inv_freq(self.cfg)
        xs = [self.embed[...][tokens] for tokens, _, _, _ in groups]
        ropes = [rope_cos_sin(positions, inv_freq, rope_scale, self.dtype) for _, positions, _, _ in groups]
        new_caches, counts = [[] for _ in groups], []
        moe_index = 0
        for li, layer in enumerate(self.layers):
            for g, (_, positions, cache, attend) in enumerate(groups):
                with jax.named_scope("attention"):
                    a, layer_cache = layer.attn(layer.input_norm(xs[g]), positions, *ropes[g], cache[li], attend)
                new_caches[g].append(layer_cache)
                xs[g] = xs[g] + a
            h = _joined([layer.post_norm(x) for x in xs])
            if layer.is_moe:
                with jax.named_scope("moe"):
                    m, c = layer.mlp(h, ctx, moe_index)
                counts.append(c)
                moe_index += 1
            else:
                m = layer.mlp(h)
            xs = [x + part for x, part in zip(xs, _split(m, xs))]
        counts = jnp.stack(counts) if counts else jnp.zeros((0, self.cfg.num_experts), jnp.int32)
        return [(self.norm(x), c) for x, c in zip(xs, new_caches)], counts

    def logits(self, hidden):
        """hidden [..., H] -> float32 logits [..., V]."""
        if self.lm_head is None:
            return jnp.einsum("...h,vh->...v", hidden, self.embed[...]).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
