"""The MoE block: router, shared experts, and routed experts held in physical slots that are
spread over the expert-parallel ranks. Runs inside shard_map: each rank holds `slots_per_rank`
slots and its own share of the tokens."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..ep import grouped_matmul, ops
from . import quant
from .layers import MLP, Linear, normal


@dataclasses.dataclass(frozen=True)
class EPContext:
    """What the MoE layers of one step need to know about expert parallelism on this rank.

    log2phy [Lm, E, R] int32 and active [N] int32 are traced (never static: a new placement or
    mask never recompiles); token_index [T] int32 numbers this rank's tokens globally; valid [T]
    bool marks real (non-padding) tokens: only they are routed to experts and counted in the loads."""
    log2phy: jax.Array
    active: jax.Array
    token_index: jax.Array
    valid: jax.Array
    num_ranks: int
    slots_per_rank: int
    axis_name: str | None   # the mesh axis of the ranks (spmd); None: no collective
    # exchange(arrays, moe_layer, phase) -> arrays received: the host transport of the multi-process
    # runtime (phase 0 sends [N, T, ...] rows to their ranks, phase 1 returns them); None: all_to_all
    exchange: Callable | None = None
    backend: str = "auto"   # EP data-path ops: "jax" (reference), "ffi" (native kernels), "auto"


def _exchange(ctx: EPContext, arrays: list, moe_layer: int, phase: int) -> list:
    """Sends arrays[i][d] to rank d and returns what every rank sent here, stacked by source."""
    if ctx.exchange is not None:
        return ctx.exchange(arrays, moe_layer, phase)
    if ctx.axis_name is not None and ctx.num_ranks > 1:
        return [jax.lax.all_to_all(a, ctx.axis_name, 0, 0, tiled=True) for a in arrays]
    return arrays


def route(cfg: ModelConfig, x, router_w, bias):
    """Router: x [T, H] -> logical ids [T, K] int32, weights [T, K] float32. `bias`: DeepSeek's
    correction bias (choice only) or gpt-oss's router bias (added to the logits)."""
    k = cfg.num_experts_per_tok
    if cfg.router == "topk_softmax":       # gpt-oss: top-k of the biased logits, softmax over those
        logits = (jnp.einsum("th,he->te", x, router_w) + bias.astype(x.dtype)).astype(jnp.float32)
        top, ids = jax.lax.top_k(logits, k)
        return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)
    if cfg.router == "softmax":
        logits = jnp.einsum("th,he->te", x, router_w)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        w, ids = jax.lax.top_k(probs, k)
        if cfg.norm_topk_prob:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        return ids.astype(jnp.int32), w
    # sigmoid scores, correction bias, grouped top-k (DeepSeek-V3)
    logits = jnp.einsum("th,he->te", x.astype(jnp.float32), router_w.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias.astype(jnp.float32)[None, :]
    t, e = choice.shape
    per_group = e // cfg.n_group
    if cfg.n_group > 1:
        top2 = jax.lax.top_k(choice.reshape(t, cfg.n_group, per_group), min(2, per_group))[0]
        _, groups = jax.lax.top_k(top2.sum(-1), cfg.topk_group)
        keep = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], groups].set(True)
        choice = jnp.where(jnp.repeat(keep, per_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, k)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), w * cfg.routed_scaling_factor


def routed_experts(x, ids, weights, experts: Callable, log2phy, ctx: EPContext, moe_layer: int):
    """x [T, H]; ids/weights [T, K]; experts(grouped [M, H], group sizes [S]) -> [M, H]: the local slots'
    expert computation; log2phy [E, R]. Returns [T, H]: sum over top-k of weight * expert(x), the
    experts run wherever their slots are."""
    n, spr = ctx.num_ranks, ctx.slots_per_rank
    t = x.shape[0]
    slots = ops.choose_slots(ids, ctx.token_index, log2phy, ctx.active, spr)
    # padding tokens (a rank without work in a prefill chunk, a free decode slot) go to no expert:
    # they are never sent, and the experts' grouped matmul only runs on the rows actually routed
    slots = jnp.where(ctx.valid[:, None], slots, -1)
    be = ctx.backend
    send_x, send_slot, send_w, _, src_token = ops.dispatch(x, slots, weights.astype(x.dtype), n, spr, backend=be)
    send_x, send_slot, send_w = _exchange(ctx, [send_x, send_slot, send_w], moe_layer, 0)
    k = send_slot.shape[-1]
    grouped, sizes, entry_row, entry_w = ops.regroup(send_x.reshape(n * t, -1), send_slot.reshape(n * t, k),
                                                     send_w.reshape(n * t, k), spr, backend=be)
    y = experts(grouped, sizes)
    rows = ops.ungroup(y, entry_row, entry_w, n * t, backend=be).reshape(n, t, -1)
    (rows,) = _exchange(ctx, [rows], moe_layer, 1)
    return ops.combine(rows, src_token, ctx.active, t, backend=be)


class ExpertArrays(nnx.Module):
    """Per-slot arrays that go with the three expert matrices (their biases, or their FP8 block
    scales), named after the matrix: paths end in w_gate / w_up / w_down, so the runtime moves,
    backs up and restores them with the matrices (model/loader.py: is_expert_path)."""

    def __init__(self, w_gate, w_up, w_down):
        self.w_gate, self.w_up, self.w_down = nnx.Param(w_gate), nnx.Param(w_up), nnx.Param(w_down)

    def get(self):
        return self.w_gate[...], self.w_up[...], self.w_down[...]


def _row_groups(sizes, rows: int):
    """[rows] int32: the group of each row of a grouped matrix (rows past the groups: len(sizes))."""
    return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows, dtype=sizes.dtype), side="right")


def clamped_swiglu(cfg: ModelConfig, gate, up):
    """gpt-oss: gate clamped above, up clamped both sides at swiglu_limit; (up + 1) * gate * sigmoid(alpha gate)."""
    gate = jnp.minimum(gate, cfg.swiglu_limit)
    up = jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
    return (up + 1) * gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha)


def expert_ffn(cfg: ModelConfig, grouped, sizes, w_gate, w_up, w_down, *, biases=None, scales=None,
               impl: str = "auto"):
    """The experts of the local slots on grouped rows [M, H] (group sizes [S]) -> [M, H]. biases: per-slot
    (gate, up, down) biases; scales: per-slot FP8 block scales of the (FP8) matrices."""
    if biases is None and scales is None and cfg.expert_act == "swiglu":
        return grouped_matmul.expert_mlp(grouped, sizes, w_gate, w_up, w_down, impl=impl)
    bo, bi = cfg.quant_block

    def gm(x, j, w):
        if scales is None:
            return grouped_matmul.grouped_matmul(x, w, sizes, zero_tail=False, impl=impl)
        return grouped_matmul.grouped_matmul_fp8(x, w, scales[j], sizes, (bi, bo), zero_tail=False, impl=impl)

    g, u = gm(grouped, 0, w_gate).astype(jnp.float32), gm(grouped, 1, w_up).astype(jnp.float32)
    if biases is not None:
        row = _row_groups(sizes, grouped.shape[0])
        b_gate, b_up, b_down = (jnp.take(b, row, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
                                for b in biases)
        g, u = g + b_gate, u + b_up
    h = clamped_swiglu(cfg, g, u) if cfg.expert_act == "clamped_swiglu" else jax.nn.silu(g) * u
    out = gm(h.astype(grouped.dtype), 2, w_down)
    if biases is not None:
        out = (out.astype(jnp.float32) + b_down).astype(grouped.dtype)
    return out


class MoEBlock(nnx.Module):
    """Routed experts in physical slot layout [slots, ...] plus optional shared experts."""

    def __init__(self, cfg: ModelConfig, num_slots: int, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        std = cfg.initializer_range
        fp32_router = cfg.router == "sigmoid_grouped"
        self.router = nnx.Param(normal(rngs, (h, cfg.num_experts), std, jnp.float32 if fp32_router else dtype))
        self.router_bias = (nnx.Param(jnp.zeros((cfg.num_experts,), jnp.float32)) if fp32_router else
                            nnx.Param(normal(rngs, (cfg.num_experts,), std, dtype)) if cfg.router == "topk_softmax"
                            else None)
        wdtype = jnp.dtype(cfg.expert_dtype) if cfg.expert_dtype else dtype
        self.w_gate = nnx.Param(normal(rngs, (num_slots, h, i), std, wdtype))
        self.w_up = nnx.Param(normal(rngs, (num_slots, h, i), std, wdtype))
        self.w_down = nnx.Param(normal(rngs, (num_slots, i, h), std, wdtype))
        # FP8 experts: block scales in [in, out] layout (random weights: scales around 1)
        bo, bi = cfg.quant_block
        self.expert_scale = (ExpertArrays(*(jnp.exp(normal(rngs, (num_slots,) + quant.scale_shape(r, c, (bi, bo)),
                                                           0.2, jnp.float32)) for r, c in ((h, i), (h, i), (i, h))))
                             if cfg.expert_dtype else None)
        self.expert_bias = (ExpertArrays(*(normal(rngs, (num_slots, n), std, dtype) for n in (i, i, h)))
                            if cfg.expert_bias else None)
        self.shared = MLP(h, cfg.shared_intermediate_size, cfg, dtype, rngs) if cfg.shared_intermediate_size else None
        self.shared_gate = Linear(h, 1, bias=False, cfg=cfg, dtype=dtype, rngs=rngs) if cfg.shared_expert_gate else None

    def _experts(self, grouped, sizes, impl):
        # FP8 slots ([in, out] layout, scales likewise) are dequantized tile by tile in the matmul
        return expert_ffn(self.cfg, grouped, sizes, self.w_gate[...], self.w_up[...], self.w_down[...],
                          biases=None if self.expert_bias is None else self.expert_bias.get(),
                          scales=None if self.expert_scale is None else self.expert_scale.get(), impl=impl)

    def __call__(self, x, ctx: EPContext, moe_layer: int):
        """x [B, S, H] -> ([B, S, H], expert token counts [E] int32 over valid tokens, all ranks)."""
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        ids, w = route(self.cfg, flat, self.router[...],
                       None if self.router_bias is None else self.router_bias[...])
        counts = jnp.zeros((self.cfg.num_experts,), jnp.int32).at[ids].add(
            jnp.broadcast_to(ctx.valid[:, None], ids.shape).astype(jnp.int32))
        if ctx.axis_name is not None and ctx.num_ranks > 1:
            counts = jax.lax.psum(counts, ctx.axis_name)
        out = routed_experts(flat, ids, w, functools.partial(self._experts, impl=grouped_matmul.impl_for_backend(
            ctx.backend)), ctx.log2phy[moe_layer], ctx, moe_layer)
        if self.shared is not None:
            sh = self.shared(flat)
            if self.shared_gate is not None:
                sh = jax.nn.sigmoid(self.shared_gate(flat)) * sh
            out = out + sh
        return out.reshape(b, s, h), counts
