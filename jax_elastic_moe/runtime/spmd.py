"""One process, N local devices, one Mesh: the whole model step runs in shard_map over the "ep" axis.

Each rank holds the dense weights, `slots_per_rank` expert slots of every MoE layer and its share of
the batch (data-parallel attention); the MoE layers exchange tokens with all_to_all. Placement
(log2phy) and the active-ranks mask are arguments of every compiled step, so changing them never
compiles again."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..model.decoder import MoEModel
from ..model.loader import is_expert_path
from ..model.moe import EPContext
from ..model.sharding import EP_AXIS, batch_spec, param_spec
from ..placement import Placement
from .sampling import sample


def key_of(path: tuple) -> str:
    return "/".join(map(str, path))


class SpmdRunner:
    """Compiled steps of one model over one mesh of local devices."""

    def __init__(self, cfg: ModelConfig, params: dict[tuple, np.ndarray], placement: Placement,
                 devices, dtype):
        self.cfg, self.dtype = cfg, dtype
        self.devices = list(devices)
        self.num_ranks = len(self.devices)
        if placement.num_ranks != self.num_ranks:
            raise ValueError(f"placement is for {placement.num_ranks} ranks, mesh has {self.num_ranks}")
        self.slots_per_rank = placement.slots_per_rank
        self.mesh = Mesh(np.array(self.devices), (EP_AXIS,))
        abstract = nnx.eval_shape(lambda: MoEModel(cfg, placement.num_slots, dtype))
        self.graphdef, abstract_state = nnx.split(abstract, nnx.Param)
        self._variables = list(nnx.to_flat_state(abstract_state))
        self.moe_layer_ids = [i for i, m in enumerate(cfg.moe_layers) if m]
        self.params = {}
        for path, var in self._variables:
            if is_expert_path(path):
                arr = self._place_logical(params[path], placement, path)
            elif path in params:
                arr = params[path]
            else:
                raise KeyError(f"parameter {key_of(path)} missing")
            self.params[key_of(path)] = jax.device_put(arr, self._sharding(param_spec(path)))
        self._compiled = {}

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _place_logical(self, logical: np.ndarray, placement: Placement, path: tuple) -> np.ndarray:
        """Physical slot layout [S, ...] of one layer's logical experts [E, ...] (empty slots zero)."""
        row = placement.phy2log[self.moe_layer_ids.index(path[1])]
        out = logical[np.maximum(row, 0)]
        out[row < 0] = 0
        return out

    # -- the traced model ---------------------------------------------------------------------
    def _model(self, params):
        flat = [(path, var.replace(params[key_of(path)])) for path, var in self._variables]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def _forward(self, params, tokens, positions, valid, cache, log2phy, active):
        """Per-rank body: tokens/positions/valid [b, s]; returns (hidden, cache, counts)."""
        model = self._model(params)
        b, s = tokens.shape
        rank = jax.lax.axis_index(EP_AXIS)
        seq = rank * b + jnp.arange(b, dtype=jnp.int32)
        token_index = (seq[:, None] * 7919 + positions).reshape(-1).astype(jnp.int32)
        ctx = EPContext(log2phy=log2phy, active=active, token_index=token_index, valid=valid.reshape(-1),
                        num_ranks=self.num_ranks, slots_per_rank=self.slots_per_rank, axis_name=EP_AXIS)
        return model(tokens, positions, cache, ctx), model

    def _specs(self):
        return {k: param_spec(tuple(k.split("/"))[-1:]) for k in self.params}

    def _shard_map(self, body, in_specs, out_specs):
        return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def _cache_specs(self, cache):
        return jax.tree.map(lambda _: batch_spec(), cache)

    def _compile(self, name, build):
        if name not in self._compiled:
            self._compiled[name] = build()
        return self._compiled[name]

    # -- steps ----------------------------------------------------------------------------------
    def score_fn(self, batch: int, seq: int):
        """jit: (params, tokens [B, S], log2phy, active) -> logits [B, S, V] float32."""
        def build():
            def body(params, tokens, log2phy, active):
                b, s = tokens.shape
                positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                empty = self._model(params).empty_cache(b, s)
                (hidden, _, counts), model = self._forward(params, tokens, positions, jnp.ones((b, s), bool),
                                                           empty, log2phy, active)
                return model.logits(hidden), counts
            f = self._shard_map(body, (self._specs(), batch_spec(), P(), P()), (batch_spec(), P()))
            return jax.jit(f)
        return self._compile(("score", batch, seq), build)

    def _abstract_model(self):
        return nnx.merge(self.graphdef, nnx.from_flat_state(self._variables))

    def prefill_fn(self, batch: int, seq: int, cache_len: int):
        """jit: (params, tokens [B, S], lengths [B], log2phy, active, key, temperature, top_p)
        -> (next tokens [B] int32, cache, counts [Lm, E]). Position lengths[b]-1 gives the logits."""
        def build():
            def body(params, tokens, lengths, log2phy, active, key, temperature, top_p):
                b, s = tokens.shape
                positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                valid = positions < lengths[:, None]
                empty = self._model(params).empty_cache(b, cache_len)
                (hidden, cache, counts), model = self._forward(params, tokens, positions, valid, empty,
                                                               log2phy, active)
                last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
                seq_ids = jax.lax.axis_index(EP_AXIS) * b + jnp.arange(b)
                return sample(model.logits(last), key, seq_ids, temperature, top_p), cache, counts
            cache_spec = self._cache_specs(self._abstract_model().empty_cache(1, 1))
            f = self._shard_map(body, (self._specs(), batch_spec(), batch_spec(), P(), P(), P(), P(), P()),
                                (batch_spec(), cache_spec, P()))
            return jax.jit(f)
        return self._compile(("prefill", batch, seq, cache_len), build)

    def decode_fn(self, batch: int, cache_len: int):
        """jit: (params, cache, tokens [B], positions [B], valid [B], log2phy, active, key, temperature,
        top_p) -> (next tokens [B], cache, counts). The cache is donated."""
        def build():
            def body(params, cache, tokens, positions, valid, log2phy, active, key, temperature, top_p):
                b = tokens.shape[0]
                (hidden, cache, counts), model = self._forward(
                    params, tokens[:, None], positions[:, None], valid[:, None], cache, log2phy, active)
                seq_ids = jax.lax.axis_index(EP_AXIS) * b + jnp.arange(b)
                return sample(model.logits(hidden[:, 0]), key, seq_ids, temperature, top_p), cache, counts
            cache_spec = self._cache_specs(self._abstract_model().empty_cache(1, 1))
            f = self._shard_map(body, (self._specs(), cache_spec, batch_spec(), batch_spec(), batch_spec(), P(),
                                       P(), P(), P(), P()), (batch_spec(), cache_spec, P()))
            return jax.jit(f, donate_argnums=(1,))
        return self._compile(("decode", batch, cache_len), build)

    # -- placement ------------------------------------------------------------------------------
    def move_experts(self, old: Placement, new: Placement):
        """Moves expert weights between slots so that slot s holds new.phy2log[:, s]; each weight is
        copied from a slot that holds it under `old` (both placements complete)."""
        src = np.zeros_like(new.phy2log)
        for layer in range(new.num_layers):
            first = {}
            for s, e in enumerate(old.phy2log[layer]):
                if e >= 0 and e not in first:
                    first[int(e)] = s
            for s, e in enumerate(new.phy2log[layer]):
                if e >= 0:
                    if int(e) not in first:
                        raise ValueError(f"expert {e} of MoE layer {layer} has no replica to copy from")
                    src[layer, s] = first[int(e)]
        keep = new.phy2log >= 0
        gather = self._gather_fn()
        for key in list(self.params):
            path = key.split("/")
            if path[-1] in ("w_gate", "w_up", "w_down"):
                m = self.moe_layer_ids.index(int(path[1]))
                self.params[key] = gather(self.params[key], jnp.asarray(src[m]), jnp.asarray(keep[m]))

    @functools.cache
    def _gather_fn(self):
        shard = self._sharding(P(EP_AXIS))

        def gather(w, src, keep):
            out = w[src]
            return jnp.where(keep.reshape((-1,) + (1,) * (w.ndim - 1)), out, jnp.zeros_like(out))
        return jax.jit(gather, out_shardings=shard, donate_argnums=(0,))

    def put_replicated(self, arr):
        return jax.device_put(arr, self._sharding(P()))

    def put_batch(self, arr):
        return jax.device_put(arr, self._sharding(batch_spec()))
