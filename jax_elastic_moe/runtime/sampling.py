"""Token sampling: greedy, temperature and top-p (nucleus), reproducible from a seed.

Every setting is per row and traced (changing one never recompiles). Row i draws from
fold_in(key(seeds[i]), sample_ids[i]); the engine makes sample_ids from the request and the number of
tokens it has so far, so a token does not depend on the batch, the slot or the rank that made it."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, seeds, sample_ids, temperature, top_p):
    """logits [B, V] float32; seeds [B] uint32; sample_ids [B] int32; temperature [B] float32 (0 =
    greedy); top_p [B] float32 in (0, 1]. Returns [B] int32 token ids."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.maximum(temperature, 1e-6)[:, None]
    scaled = logits / t
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly before each token
    keep = before < top_p[:, None]                         # the first token is always kept
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, sample_ids)
    pick = jax.vmap(jax.random.categorical)(keys, masked)
    drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
