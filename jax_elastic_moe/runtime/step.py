"""The step program, built in one place for both runtime modes.

A step runs on one rank's rows and that rank's KV cache: `slots` cache rows of `cache_len` positions
(data-parallel attention: a request's cache lives on one rank). Two kinds, each a fixed shape:

  prefill  `rows` rows of a chunk of up to `chunk` prompt tokens; row i writes the cache row slot[i]
           (gathered, run, scattered back: the other slots are untouched); a first chunk (every row
           at position 0) attends to its own `chunk` positions only
  decode   one token for every cache row (rows == slots, slot i is row i)

Padding rows and padding tokens have valid False and position cache_len, so their cache writes are
dropped; a padding row's slot is `slots` (out of range: its gather is clipped, its scatter dropped).
Every row samples one token at chunk index last[i]. The spmd runner wraps the body in shard_map over
the mesh, the mooncake worker jits it alone with its host exchange: the same code in both."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ..model.moe import EPContext
from .sampling import sample

# per-row inputs of a step, in argument order: name -> (dtype, has a chunk axis)
ROW_INPUTS = {
    "tokens": (jnp.int32, True), "positions": (jnp.int32, True), "valid": (jnp.bool_, True),
    "slot": (jnp.int32, False), "last": (jnp.int32, False), "seeds": (jnp.uint32, False),
    "sample_ids": (jnp.int32, False), "temperature": (jnp.float32, False), "top_p": (jnp.float32, False),
}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The shape of one rank's step; a runtime compiles one program per StepShape (and mesh)."""
    kind: str           # "prefill" | "decode"
    rows: int           # rows per rank (decode: == slots)
    chunk: int          # tokens per row (decode: 1)
    slots: int          # KV-cache rows per rank
    cache_len: int      # positions per cache row
    attend: int = 0     # cache positions attended to (0: all); a first prefill chunk: its own length

    def as_list(self) -> list:
        return [self.kind, self.rows, self.chunk, self.slots, self.cache_len, self.attend]

    @classmethod
    def from_list(cls, v) -> "StepShape":
        return cls(str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]))


def row_abstract(shape: StepShape, rows: int | None = None, sharding=None) -> list:
    """ShapeDtypeStructs of the ROW_INPUTS for `rows` rows (default shape.rows)."""
    rows = shape.rows if rows is None else rows
    return [jax.ShapeDtypeStruct((rows, shape.chunk) if chunked else (rows,), dtype, sharding=sharding)
            for dtype, chunked in ROW_INPUTS.values()]


def empty_cache(graphdef, variables, slots: int, cache_len: int):
    """The model's KV cache for `slots` rows (abstract when called under eval_shape)."""
    return nnx.merge(graphdef, nnx.from_flat_state(variables)).empty_cache(slots, cache_len)


def make_step(graphdef, variables, key_of: Callable, shape: StepShape, *, num_ranks: int, slots_per_rank: int,
              backend: str, axis_name: str | None = None, rank: int = 0, exchange_for: Callable | None = None):
    """The per-rank step body:

      (params {key: array}, cache, *ROW_INPUTS, log2phy, active, seq) -> (next [rows] int32, cache,
      expert counts [Lm, E])

    axis_name: the mesh axis of the ranks (spmd, all_to_all); otherwise exchange_for(seq, active) gives
    the exchange of the step numbered seq over the traced live-rank mask (mooncake) and `rank`
    numbers this rank's tokens."""
    decode = shape.kind == "decode"

    def step(params, cache, tokens, positions, valid, slot, last, seeds, sample_ids, temperature, top_p,
             log2phy, active, seq):
        model = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(params[key_of(p)])) for p, v in variables]))
        rows = tokens.shape[0]
        r = jax.lax.axis_index(axis_name) if axis_name is not None else rank
        token_index = ((r * rows + jnp.arange(rows, dtype=jnp.int32))[:, None] * 7919 + positions).reshape(-1)
        ctx = EPContext(log2phy=log2phy, active=active, token_index=token_index.astype(jnp.int32),
                        valid=valid.reshape(-1), num_ranks=num_ranks, slots_per_rank=slots_per_rank,
                        axis_name=axis_name, exchange=None if exchange_for is None else exchange_for(seq, active),
                        backend=backend)
        rows_cache = cache if decode else jax.tree.map(lambda c: jnp.take(c, slot, axis=0, mode="clip"), cache)
        hidden, rows_cache, counts = model(tokens, positions, rows_cache, ctx, shape.attend or None)
        if decode:
            cache = rows_cache
        else:
            cache = jax.tree.map(lambda c, new: c.at[slot].set(new, mode="drop"), cache, rows_cache)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return sample(model.logits(h), seeds, sample_ids, temperature, top_p), cache, counts
    return step
