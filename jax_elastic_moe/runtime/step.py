"""The step program, built in one place for both runtime modes.

A step runs on one rank's rows and that rank's KV cache: `slots` cache rows of `cache_len` positions
(data-parallel attention: a request's cache lives on one rank). Two kinds, each a fixed shape:

  decode   one token for every cache row (rows == slots, slot i is row i)
  prefill  `rows` rows of a chunk of up to `chunk` prompt tokens, row i writing the cache row slot[i]
           (gathered, run, scattered back); a first chunk (every row at position 0) attends to its own
           `chunk` positions only. The same step also decodes one token for every cache row (a
           second row group, inputs named decode_*): running requests keep decoding while a prompt
           is prefilled, in one step instead of two (the groups attend separately and share the
           MLP/MoE layers, so one exchange per MoE layer carries both)

Padding rows and padding tokens have valid False and position cache_len, so their cache writes are
dropped and they are routed to no expert; a padding prefill row's slot is `slots` (out of range: its
gather is clipped, its scatter dropped). Every row samples one token at chunk index last[i]; a step's
next tokens are its groups' rows in order (prefill rows, then decode rows). The spmd runner wraps the
body in shard_map over the mesh, the mooncake worker jits it alone with its host exchange: the same
code in both."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
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


def row_groups(shape: StepShape) -> list[tuple[str, int, int]]:
    """(input name prefix, rows per rank, chunk) of each row group of a step, in order."""
    if shape.kind == "decode":
        return [("", shape.slots, 1)]
    return [("", shape.rows, shape.chunk), ("decode_", shape.slots, 1)]


def input_rows(shape: StepShape) -> dict[str, int]:
    """Every per-row input of a step, in argument order: name -> rows per rank."""
    return {prefix + name: rows for prefix, rows, _ in row_groups(shape) for name in ROW_INPUTS}


def out_rows(shape: StepShape) -> int:
    """Next tokens per rank of a step: every group's rows."""
    return sum(rows for _, rows, _ in row_groups(shape))


def row_abstract(shape: StepShape, ranks: int = 1, sharding=None) -> list:
    """ShapeDtypeStructs of the step's per-row inputs over `ranks` ranks (rank-major)."""
    return [jax.ShapeDtypeStruct((ranks * rows, chunk) if chunked else (ranks * rows,), dtype, sharding=sharding)
            for _, rows, chunk in row_groups(shape) for dtype, chunked in ROW_INPUTS.values()]


def padding_value(name: str, cache_len: int, slot: int):
    """What a padding row holds in the ROW_INPUTS input `name`: position cache_len (its cache writes
    dropped), `slot`, top_p 1, and 0 elsewhere (no token valid, so none is routed to an expert)."""
    return {"positions": cache_len, "slot": slot, "top_p": 1.0}.get(name, 0)


def padding_rows(shape: StepShape) -> list:
    """A step's per-row inputs (numpy, input_rows order, one rank) with every row padding, slots out of
    range."""
    return [np.full(a.shape, padding_value(name.removeprefix("decode_"), shape.cache_len, shape.slots), a.dtype)
            for name, a in zip(input_rows(shape), row_abstract(shape))]


def empty_cache(graphdef, variables, slots: int, cache_len: int):
    """The model's KV cache for `slots` rows (abstract when called under eval_shape)."""
    return nnx.merge(graphdef, nnx.from_flat_state(variables)).empty_cache(slots, cache_len)


def make_step(graphdef, variables, key_of: Callable, shape: StepShape, *, num_ranks: int, slots_per_rank: int,
              backend: str, axis_name: str | None = None, rank: int = 0, exchange_for: Callable | None = None):
    """The per-rank step body:

      (params {key: array}, cache, *inputs (input_rows order), log2phy, active, seq)
        -> (next [out_rows] int32, cache, expert counts [Lm, E])

    axis_name: the mesh axis of the ranks (spmd, all_to_all); otherwise exchange_for(seq, active) gives
    the exchange of the step numbered seq over the traced live-rank mask (mooncake) and `rank`
    numbers this rank's tokens."""
    decode = shape.kind == "decode"
    groups = row_groups(shape)
    per_rank = out_rows(shape)
    n_in = len(ROW_INPUTS)

    def step(params, cache, *args):
        model = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(params[key_of(p)])) for p, v in variables]))
        log2phy, active, seq = args[-3:]
        ins = [dict(zip(ROW_INPUTS, args[g * n_in:(g + 1) * n_in])) for g in range(len(groups))]
        r = jax.lax.axis_index(axis_name) if axis_name is not None else rank
        starts = [sum(rows for _, rows, _ in groups[:g]) for g in range(len(groups))]
        token_index = jnp.concatenate([
            ((r * per_rank + start + jnp.arange(rows, dtype=jnp.int32))[:, None] * 7919 + i["positions"]).reshape(-1)
            for (_, rows, _), start, i in zip(groups, starts, ins)])
        ctx = EPContext(log2phy=log2phy, active=active, token_index=token_index.astype(jnp.int32),
                        valid=jnp.concatenate([i["valid"].reshape(-1) for i in ins]), num_ranks=num_ranks,
                        slots_per_rank=slots_per_rank, axis_name=axis_name,
                        exchange=None if exchange_for is None else exchange_for(seq, active), backend=backend)
        if decode:
            (out,), counts = model.groups([(ins[0]["tokens"], ins[0]["positions"], cache, None)], ctx)
            cache = out[1]
            outs = [out]
        else:
            pre, dec = ins
            rows_cache = jax.tree.map(lambda c: jnp.take(c, pre["slot"], axis=0, mode="clip"), cache)
            outs, counts = model.groups([(pre["tokens"], pre["positions"], rows_cache, shape.attend or None),
                                         (dec["tokens"], dec["positions"], cache, None)], ctx)
            # the decode group wrote every running slot; the prefill rows' slots are not among them
            # (their decode rows are padding), so scattering the prefill rows back loses nothing
            cache = jax.tree.map(lambda c, new: c.at[pre["slot"]].set(new, mode="drop"), outs[1][1], outs[0][1])
        h = jnp.concatenate([jnp.take_along_axis(hidden, i["last"][:, None, None], axis=1)[:, 0]
                             for (hidden, _), i in zip(outs, ins)])
        cat = {name: jnp.concatenate([i[name] for i in ins]) for name in ("seeds", "sample_ids", "temperature", "top_p")}
        return sample(model.logits(h), cat["seeds"], cat["sample_ids"], cat["temperature"], cat["top_p"]), cache, counts
    return step
