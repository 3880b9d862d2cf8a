"""Pure-JAX reference of the expert-parallel data path: replica choice, dispatch, regroup,
ungroup, combine. Every fast path (the XLA FFI ops in ep/ffi.py) must match these exactly.

Data flow of one MoE layer on one rank (T local tokens, K top-k, N ranks, S slots per rank):
  choose_slots   logical ids [T, K]  -> physical slots [T, K]
  dispatch       x [T, H]            -> send rows [N, T, H]: each token at most once per destination
                                        rank (dropless by construction: capacity T), with the local
                                        slots [N, T, K] and weights [N, T, K] it needs there
  (exchange)     all_to_all          -> rows received from every source, [N, T, H]
  regroup        rows [M0, H]        -> one entry per (row, local slot), sorted by slot: the input of
                                        a grouped matmul, [M, H] with group sizes [S]
  ungroup        entry outputs [M,H] -> per row, the weighted sum of its entries, [M0, H]
  (exchange)     all_to_all back
  combine        rows [N, T, H]      -> per token, the sum over destination ranks, [T, H]
The top-k weights are applied on the expert side (ungroup), so one row per (token, rank) returns.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def live_replicas(log2phy, active, slots_per_rank):
    """log2phy [E, R] int32 (-1 pad), active [N] int32 -> live [E, R] bool, live count [E] int32."""
    rank = jnp.where(log2phy >= 0, log2phy // slots_per_rank, 0)
    live = (log2phy >= 0) & (active[rank] > 0)
    return live, live.sum(-1).astype(jnp.int32)


def choose_slots(topk_ids, token_index, log2phy, active, slots_per_rank):
    """Maps logical expert ids to physical slots, spreading tokens over the live replicas.

    topk_ids [T, K] int32 logical ids; token_index [T] int32 global token numbers (deterministic
    spreading: entry (t, k) takes live replica (token_index[t] + k) mod live_count);
    log2phy [E, R]; active [N]. Returns slots [T, K] int32, -1 where the expert has no live replica
    (the engine refuses such placements before a step runs)."""
    live, count = live_replicas(log2phy, active, slots_per_rank)
    k = jnp.arange(topk_ids.shape[1], dtype=jnp.int32)
    cnt = count[topk_ids]                                        # [T, K]
    choice = (token_index[:, None] + k[None, :]) % jnp.maximum(cnt, 1)
    # position of the choice-th live replica: first r whose running live count exceeds `choice`
    running = jnp.cumsum(live.astype(jnp.int32), axis=-1)[topk_ids]   # [T, K, R]
    col = jnp.sum(running <= choice[..., None], axis=-1)
    col = jnp.minimum(col, log2phy.shape[1] - 1)
    slot = log2phy[topk_ids, col]
    return jnp.where(cnt > 0, slot, -1).astype(jnp.int32)


def dispatch(x, slots, weights, num_ranks, slots_per_rank, *, active=None):
    """Groups token rows by destination rank.

    x [T, H]; slots [T, K] int32 global slots (-1 = none); weights [T, K]; active [N] int32 0/1 or
    None (all ranks): rows for inactive ranks are never sent (their entries count as none).
    Returns (send_x [N, T, H], send_slot [N, T, K] int32 local slot or -1, send_w [N, T, K],
    counts [N] int32, src_token [N, T] int32 token of each row or -1). Row j of destination d is
    the j-th token (ascending) with an entry on rank d; rows past counts[d] are zero / -1."""
    num_tokens, k = slots.shape
    dest = jnp.where(slots >= 0, slots // slots_per_rank, -1)                    # [T, K]
    ranks = jnp.arange(num_ranks, dtype=jnp.int32)
    on_rank = dest[None, :, :] == ranks[:, None, None]                           # [N, T, K]
    if active is not None:
        on_rank = on_rank & (active[:, None, None] > 0)
    has = on_rank.any(-1)                                                         # [N, T]
    pos = jnp.cumsum(has, axis=1, dtype=jnp.int32) - 1
    row = jnp.where(has, pos, num_tokens)                                         # out of range = drop
    d_idx = jnp.broadcast_to(ranks[:, None], row.shape)
    tok = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[None, :], row.shape)
    send_x = jnp.zeros((num_ranks, num_tokens, x.shape[-1]), x.dtype)
    send_x = send_x.at[d_idx, row].set(jnp.broadcast_to(x[None], (num_ranks,) + x.shape), mode="drop")
    local = jnp.where(on_rank, slots[None] % slots_per_rank, -1)
    send_slot = jnp.full((num_ranks, num_tokens, k), -1, jnp.int32).at[d_idx, row].set(local, mode="drop")
    w = jnp.where(on_rank, weights[None], 0).astype(weights.dtype)
    send_w = jnp.zeros((num_ranks, num_tokens, k), weights.dtype).at[d_idx, row].set(w, mode="drop")
    src_token = jnp.full((num_ranks, num_tokens), -1, jnp.int32).at[d_idx, row].set(tok, mode="drop")
    return send_x, send_slot, send_w, has.sum(1).astype(jnp.int32), src_token


def regroup(rows, row_slot, row_w, slots_per_rank):
    """Expands received rows into (row, local slot) entries sorted by slot.

    rows [M0, H]; row_slot [M0, K] int32 local slot or -1; row_w [M0, K].
    Returns (grouped [M, H], group_sizes [S] int32, entry_row [M] int32 (-1 pad), entry_w [M]),
    M = M0 * min(K, S); entries are ordered by (slot, row, k); padding sits after all groups."""
    m0, k = row_slot.shape
    kk = min(k, slots_per_rank)
    flat_slot = row_slot.reshape(-1)
    key = jnp.where(flat_slot >= 0, flat_slot, slots_per_rank)   # empty entries sort last
    order = jnp.argsort(key, stable=True)[: m0 * kk]
    valid = key[order] < slots_per_rank
    entry_row = jnp.where(valid, (order // k).astype(jnp.int32), -1)
    entry_w = jnp.where(valid, row_w.reshape(-1)[order], 0)
    grouped = jnp.where(valid[:, None], rows[jnp.maximum(entry_row, 0)], 0)
    sizes = jnp.zeros(slots_per_rank + 1, jnp.int32).at[key].add(1)[:slots_per_rank]
    return grouped, sizes, entry_row, entry_w


def ungroup(entry_out, entry_row, entry_w, num_rows):
    """out [num_rows, H]: per row, the sum over its entries of weight * entry output (float32 sum)."""
    valid = entry_row >= 0
    contrib = jnp.where(valid[:, None], entry_out.astype(jnp.float32) * entry_w[:, None].astype(jnp.float32), 0)
    out = jnp.zeros((num_rows, entry_out.shape[-1]), jnp.float32)
    out = out.at[jnp.where(valid, entry_row, num_rows)].add(contrib, mode="drop")
    return out.astype(entry_out.dtype)


def combine(back, src_token, active, num_tokens, *, renormalize=False, send_w=None):
    """back [N, C, H] rows returned by each destination; src_token [N, C] (-1 pad); active [N].
    Returns [num_tokens, H]: per token the sum of its rows over active destinations (float32 sum).

    renormalize=True (needs send_w [N, C, K], the weights dispatch sent with each row) multiplies
    each token's sum by live_weight_scale(...): 1 / (sum of its top-k weights on active ranks), 0
    where none is live, so the weights of the live entries are renormalised to sum to one."""
    use = (src_token >= 0) & (active[:, None] > 0)
    idx = jnp.where(use, src_token, num_tokens).reshape(-1)
    vals = jnp.where(use[..., None], back.astype(jnp.float32), 0).reshape(-1, back.shape[-1])
    out = jnp.zeros((num_tokens, back.shape[-1]), jnp.float32).at[idx].add(vals, mode="drop")
    if renormalize:
        out = out * live_weight_scale(send_w, src_token, active, num_tokens)[:, None]
    return out.astype(back.dtype)


def live_weight_scale(send_w, src_token, active, num_tokens):
    """send_w [N, C, K], src_token [N, C], active [N] -> [num_tokens] float32: 1 / (sum of each
    token's weights in rows on active ranks), 0 for a token with no live weight."""
    if send_w is None:
        raise ValueError("combine(renormalize=True) needs send_w, the [N, C, K] weights from dispatch")
    use = (src_token >= 0) & (active[:, None] > 0)
    row_w = jnp.where(use, send_w.astype(jnp.float32).sum(-1), 0).reshape(-1)
    idx = jnp.where(use, src_token, num_tokens).reshape(-1)
    total = jnp.zeros((num_tokens,), jnp.float32).at[idx].add(row_w, mode="drop")
    return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)


def expert_mlp(grouped, group_sizes, w_gate, w_up, w_down):
    """SwiGLU of each entry with its group's weights: grouped [M, H], w_gate/w_up [S, H, I],
    w_down [S, I, H] -> [M, H]. Rows past sum(group_sizes) give zeros."""
    g = jax.lax.ragged_dot(grouped, w_gate, group_sizes)
    u = jax.lax.ragged_dot(grouped, w_up, group_sizes)
    h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(grouped.dtype)
    return jax.lax.ragged_dot(h, w_down, group_sizes)
