"""Token sampling: greedy, temperature and top-p (nucleus), reproducible from a seed.

Temperature and top_p are traced scalars (changing them never recompiles). Each sequence draws from
its own key, fold_in(key, sequence id), so a result does not depend on how the batch is split."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, key, seq_ids, temperature, top_p):
    """logits [B, V] float32; key: a PRNG key for this step; seq_ids [B] int32;
    temperature: 0 = greedy; top_p in (0, 1]. Returns [B] int32 token ids."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.maximum(temperature, 1e-6)
    scaled = logits / t
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly before each token
    keep = before < top_p                                  # the first token is always kept
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(seq_ids)
    pick = jax.vmap(jax.random.categorical)(keys, masked)
    drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
