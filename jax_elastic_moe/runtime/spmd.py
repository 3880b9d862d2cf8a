"""One process, N local devices, one Mesh: the whole model step runs in shard_map over the "ep" axis.

Each rank holds the dense weights, `slots_per_rank` expert slots of every MoE layer and its share of
the batch (data-parallel attention); the MoE layers exchange tokens with all_to_all. Placement
(log2phy) and the active-ranks mask are arguments of every compiled step, so changing them never
compiles again. After a failure, `survivors()` builds the runner of a new mesh over the surviving
devices from the arrays they already hold (plus the host backup for experts that lost every copy)."""
from __future__ import annotations

import functools
import io
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax._src import compiler as _compiler
from jax.experimental import serialize_executable as _serialize
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..model.decoder import MoEModel
from ..model.loader import EXPERT_PARAMS, is_expert_path
from ..model.moe import EPContext
from ..model.sharding import EP_AXIS, batch_spec, param_spec
from ..placement import Placement
from .sampling import sample


def key_of(path: tuple) -> str:
    return "/".join(map(str, path))


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: ModelConfig, num_slots: int, dtype):
    """(graphdef, [(path, abstract Param)]) of the model: traced once per shape, not per mesh."""
    abstract = nnx.eval_shape(lambda: MoEModel(cfg, num_slots, dtype))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return graphdef, tuple(nnx.to_flat_state(state))


class _OntoDevices(_serialize._JaxPjrtUnpickler):
    """Unpickles a serialized executable onto other devices: each device id of the pickle (the
    executable's, and those of its argument shardings) maps to the device at the same mesh position."""

    def __init__(self, data: bytes, mapping: dict, devices: list):
        super().__init__(io.BytesIO(data), devices[0].client, devices)
        self._mapping, self._devices = mapping, devices

    def persistent_load(self, pid):
        if pid[0] == "device":
            return self._mapping[pid[1]]
        if pid[0] == "exec":        # the executable's own device assignment names the new devices too
            options = _compiler.get_compile_options(
                num_replicas=1, num_partitions=len(self._devices),
                device_assignment=np.array(self._devices)[None, :])
            return self.backend.deserialize_executable(pid[1], self.execution_devices, options)
        return super().persistent_load(pid)


class Portable:
    """A compiled step that loads onto any mesh of as many devices as the one it was compiled for.

    The SPMD program names mesh positions, never devices, so one compile per mesh size serves every
    set of survivors of that size; loading (deserializing) costs a small fraction of compiling."""

    def __init__(self, compiled, devices):
        self.data, self.in_tree, self.out_tree = _serialize.serialize(compiled)
        self.devices = list(devices)

    def load(self, devices):
        devices = list(devices)
        if len(devices) != len(self.devices):
            raise ValueError(f"compiled for {len(self.devices)} devices, asked to load on {len(devices)}")
        mapping = {a.id: b for a, b in zip(self.devices, devices)}
        exe, args, no_kwargs = _OntoDevices(self.data, mapping, devices).load()
        return jax.stages.Compiled(exe.load(), [], self.in_tree.unflatten(args), self.out_tree,
                                   no_kwargs=no_kwargs)


class SpmdRunner:
    """Compiled steps of one model over one mesh of local devices.

    placement: over this mesh's ranks (N' = len(devices)); params: {key: jax.Array} placed on the mesh,
    or None for a runner that only compiles (a precompiled fallback for a future mesh)."""

    def __init__(self, cfg: ModelConfig, dtype, devices, placement: Placement, params: dict | None,
                 backend: str = "auto"):
        self.cfg, self.dtype, self.backend = cfg, dtype, backend
        self.devices = list(devices)
        self.num_ranks = len(self.devices)
        if placement.num_ranks != self.num_ranks:
            raise ValueError(f"placement is for {placement.num_ranks} ranks, mesh has {self.num_ranks}")
        self.slots_per_rank = placement.slots_per_rank
        self.mesh = Mesh(np.array(self.devices), (EP_AXIS,))
        self.graphdef, self._variables = abstract_model(cfg, placement.num_slots, jnp.dtype(dtype))
        self.moe_layer_ids = [i for i, m in enumerate(cfg.moe_layers) if m]
        self.placement = placement
        self.params = params
        self._compiled = {}
        self._pending: dict = {}
        self._lock = threading.Lock()
        self.log2phy = self.put_replicated(placement.log2phy)
        self.active = self.put_replicated(np.ones(self.num_ranks, np.int32))

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg, dtype, devices, placement: Placement, host_params: dict[tuple, np.ndarray],
               backend: str = "auto"):
        """From host weights with experts in logical layout [E, ...]."""
        run = cls(cfg, dtype, devices, placement, None, backend)
        params = {}
        for path, _ in run._variables:
            if path not in host_params:
                raise KeyError(f"parameter {key_of(path)} missing")
            arr = host_params[path]
            if is_expert_path(path):
                arr = run._physical(arr, placement.phy2log[run.moe_index(path)])
            params[key_of(path)] = jax.device_put(arr, run._sharding(param_spec(path)))
        run.params = params
        return run

    def moe_index(self, path) -> int:
        return self.moe_layer_ids.index(int(path[1]))

    @staticmethod
    def _physical(logical: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Slot layout [S, ...] of one layer's logical experts [E, ...] (empty slots zero)."""
        out = logical[np.maximum(row, 0)]
        out[row < 0] = 0
        return out

    def survivors(self, keep: list[int], placement: Placement, backup: dict[tuple, np.ndarray],
                  compiled: dict | None = None) -> tuple["SpmdRunner", dict]:
        """The runner of the mesh over self.devices[keep] with `placement` (over len(keep) ranks).

        Dense weights come from the survivors' own replicas; an expert slot keeps its weights when
        it already held that expert, else copies them from a surviving replica, else from `backup`
        (host memory, logical layout). Returns (runner, counts of copies by source)."""
        new = SpmdRunner(self.cfg, self.dtype, [self.devices[k] for k in keep], placement, None, self.backend)
        if compiled:
            new._compiled.update(compiled)
        spr, old_spr = placement.slots_per_rank, self.slots_per_rank
        stats = {"kept": 0, "peer": 0, "backup": 0}
        params = {}
        for path, _ in self._variables:
            key = key_of(path)
            shards = {s.device: s.data for s in self.params[key].addressable_shards}
            if not is_expert_path(path):
                pieces = [shards[d] for d in new.devices]
                params[key] = jax.make_array_from_single_device_arrays(
                    self.params[key].shape, new._sharding(P()), pieces)
                continue
            m = self.moe_index(path)
            old_row, new_row = self.placement.phy2log[m], placement.phy2log[m]
            # Survivors' slots go through host memory: a copy, no compilation on the recovery path.
            local = {r: np.asarray(shards[self.devices[r]]) for r in keep}
            where = {}                              # expert -> (old rank, local slot) on a survivor
            for r in keep:
                for j in range(old_spr):
                    e = int(old_row[r * old_spr + j])
                    if e >= 0:
                        where.setdefault(e, (r, j))
            blocks = []
            for new_rank, old_rank in enumerate(keep):
                block = np.zeros((spr,) + local[old_rank].shape[1:], local[old_rank].dtype)
                for j in range(spr):
                    e = int(new_row[new_rank * spr + j])
                    if e < 0:
                        continue
                    if j < old_spr and int(old_row[old_rank * old_spr + j]) == e:
                        block[j] = local[old_rank][j]; stats["kept"] += 1
                    elif e in where:
                        r, k = where[e]
                        block[j] = local[r][k]; stats["peer"] += 1
                    else:
                        block[j] = backup[path][e]; stats["backup"] += 1
                blocks.append(jax.device_put(block, self.devices[old_rank]))
            shape = (placement.num_slots,) + tuple(self.params[key].shape[1:])
            params[key] = jax.make_array_from_single_device_arrays(shape, new._sharding(param_spec(path)), blocks)
        new.params = params
        return new, stats

    # -- the traced model ---------------------------------------------------------------------
    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _model(self, params):
        flat = [(path, var.replace(params[key_of(path)])) for path, var in self._variables]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def _forward(self, params, tokens, positions, valid, cache, log2phy, active):
        """Per-rank body: tokens/positions/valid [b, s] -> ((hidden, cache, counts), model)."""
        model = self._model(params)
        b, s = tokens.shape
        rank = jax.lax.axis_index(EP_AXIS)
        seq = rank * b + jnp.arange(b, dtype=jnp.int32)
        token_index = (seq[:, None] * 7919 + positions).reshape(-1).astype(jnp.int32)
        ctx = EPContext(log2phy=log2phy, active=active, token_index=token_index, valid=valid.reshape(-1),
                        num_ranks=self.num_ranks, slots_per_rank=self.slots_per_rank, axis_name=EP_AXIS,
                        backend=self.backend)
        return model(tokens, positions, cache, ctx), model

    def _param_specs(self):
        return {key_of(path): param_spec(path) for path, _ in self._variables}

    def _abstract_params(self):
        return {key_of(path): jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._sharding(param_spec(path)))
                for path, v in self._variables}

    def _cache_spec(self):
        model = nnx.merge(self.graphdef, nnx.from_flat_state(self._variables))
        return jax.tree.map(lambda _: batch_spec(), model.empty_cache(1, 1))

    def _abstract(self, shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding(spec))

    def _aot(self, name, fn, *abstract_args):
        """Compiles fn for these argument shapes once (ahead of time); thread-safe, and two different
        programs may compile at the same time."""
        with self._lock:
            if name in self._compiled:
                return self._compiled[name]
            owner = name not in self._pending
            pending = self._pending.setdefault(name, threading.Event())
        if not owner:
            pending.wait()
            return self._compiled[name]
        try:
            compiled = fn.lower(*abstract_args).compile()
            with self._lock:
                self._compiled[name] = compiled
        finally:
            with self._lock:
                self._pending.pop(name, None)
            pending.set()
        return compiled

    def _common_abstract(self):
        key = jax.eval_shape(lambda: jax.random.key(0))
        rep = self._sharding(P())
        return (self._abstract(self.placement.log2phy.shape, jnp.int32, P()),
                self._abstract((self.num_ranks,), jnp.int32, P()),
                jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
                self._abstract((), jnp.float32, P()), self._abstract((), jnp.float32, P()))

    # -- steps ----------------------------------------------------------------------------------
    def score_fn(self, batch: int, seq: int):
        """(params, tokens [B, S], log2phy, active) -> (logits [B, S, V] float32, counts)."""
        def body(params, tokens, log2phy, active):
            b, s = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            empty = self._model(params).empty_cache(b, s)
            (hidden, _, counts), model = self._forward(params, tokens, positions, jnp.ones((b, s), bool),
                                                       empty, log2phy, active)
            return model.logits(hidden), counts
        f = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=(self._param_specs(), batch_spec(), P(), P()),
                                  out_specs=(batch_spec(), P()), check_vma=False))
        common = self._common_abstract()
        return self._aot(("score", batch, seq), f, self._abstract_params(),
                         self._abstract((batch, seq), jnp.int32, batch_spec()), common[0], common[1])

    def prefill_fn(self, batch: int, seq: int, cache_len: int):
        """(params, tokens [B, S], lengths [B], sample_ids [B], log2phy, active, key, temperature, top_p)
        -> (next tokens [B] int32, cache, counts [Lm, E]); position lengths[b]-1 gives the logits."""
        def body(params, tokens, lengths, sample_ids, log2phy, active, key, temperature, top_p):
            b, s = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            valid = positions < lengths[:, None]
            empty = self._model(params).empty_cache(b, cache_len)
            (hidden, cache, counts), model = self._forward(params, tokens, positions, valid, empty, log2phy, active)
            last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
            return sample(model.logits(last), key, sample_ids, temperature, top_p), cache, counts
        bs = batch_spec()
        f = jax.jit(jax.shard_map(body, mesh=self.mesh,
                                  in_specs=(self._param_specs(), bs, bs, bs, P(), P(), P(), P(), P()),
                                  out_specs=(bs, self._cache_spec(), P()), check_vma=False))
        vec = self._abstract((batch,), jnp.int32, bs)
        return self._aot(("prefill", batch, seq, cache_len), f, self._abstract_params(),
                         self._abstract((batch, seq), jnp.int32, bs), vec, vec, *self._common_abstract())

    def decode_fn(self, batch: int, cache_len: int):
        """(params, cache, tokens [B], positions [B], valid [B], sample_ids [B], log2phy, active, key,
        temperature, top_p) -> (next tokens [B], cache, counts). The cache is donated."""
        def body(params, cache, tokens, positions, valid, sample_ids, log2phy, active, key, temperature, top_p):
            (hidden, cache, counts), model = self._forward(
                params, tokens[:, None], positions[:, None], valid[:, None], cache, log2phy, active)
            return sample(model.logits(hidden[:, 0]), key, sample_ids, temperature, top_p), cache, counts
        bs = batch_spec()
        cache_spec = self._cache_spec()
        f = jax.jit(jax.shard_map(body, mesh=self.mesh,
                                  in_specs=(self._param_specs(), cache_spec, bs, bs, bs, bs, P(), P(), P(), P(), P()),
                                  out_specs=(bs, cache_spec, P()), check_vma=False), donate_argnums=(1,))
        model = nnx.merge(self.graphdef, nnx.from_flat_state(self._variables))
        cache = jax.tree.map(lambda a: self._abstract(a.shape, a.dtype, bs),
                             jax.eval_shape(lambda: model.empty_cache(batch, cache_len)))
        vec = self._abstract((batch,), jnp.int32, bs)
        return self._aot(("decode", batch, cache_len), f, self._abstract_params(), cache, vec, vec,
                         self._abstract((batch,), jnp.bool_, bs), vec, *self._common_abstract())

    def compiled_shapes(self) -> list:
        return list(self._compiled)

    def precompile(self, names: list, parallel: bool = False):
        """Compiles the steps named like compiled_shapes() entries; `parallel`: one thread each
        (XLA compiles outside the GIL, so two programs take about the time of one on two cores)."""
        def one(name):
            kind, *dims = name
            getattr(self, f"{kind}_fn")(*dims)
        if parallel and len(names) > 1:
            threads = [threading.Thread(target=one, args=(n,)) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for name in names:
                one(name)
        return dict(self._compiled)

    # -- the runtime interface the engine drives (shared with the multi-process runtime) ----------
    @property
    def num_live(self) -> int:
        return self.num_ranks

    def _sampling(self, sampling):
        seed, temperature, top_p = sampling
        return jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p)

    def prefill(self, tokens, lengths, sample_ids, cache_len: int, sampling):
        """tokens [B, S], lengths / sample_ids [B] numpy -> (next tokens [B], counts [Lm, E]); keeps
        the KV cache for decode."""
        fn = self.prefill_fn(tokens.shape[0], tokens.shape[1], cache_len)
        nxt, self._cache, counts = fn(self.params, self.put_batch(tokens), self.put_batch(lengths),
                                      self.put_batch(sample_ids), self.log2phy, self.active,
                                      *self._sampling(sampling))
        self._cache_len = cache_len
        return np.asarray(nxt), np.asarray(counts)

    def decode(self, tokens, positions, valid, sample_ids, sampling):
        """One decode step of every row: tokens / positions / valid / sample_ids [B] numpy."""
        fn = self.decode_fn(tokens.shape[0], self._cache_len)
        nxt, self._cache, counts = fn(self.params, self._cache, self.put_batch(tokens), self.put_batch(positions),
                                      self.put_batch(valid), self.put_batch(sample_ids), self.log2phy,
                                      self.active, *self._sampling(sampling))
        return np.asarray(nxt), np.asarray(counts)

    def ensure_compiled(self, shapes: list) -> float:
        """Compiles these steps now (two at a time); returns the seconds it took."""
        t = time.perf_counter()
        self.precompile(shapes, parallel=True)
        return time.perf_counter() - t

    # -- placement ------------------------------------------------------------------------------
    def set_placement(self, new: Placement):
        """Moves expert weights between slots so slot s holds new.phy2log[:, s], each copied from a
        slot that holds it now (both placements complete over this mesh)."""
        src = np.zeros_like(new.phy2log)
        for layer in range(new.num_layers):
            first = {}
            for s, e in enumerate(self.placement.phy2log[layer]):
                if e >= 0:
                    first.setdefault(int(e), s)
            for s, e in enumerate(new.phy2log[layer]):
                if e >= 0:
                    if int(e) not in first:
                        raise ValueError(f"expert {e} of MoE layer {layer} has no replica to copy from")
                    src[layer, s] = first[int(e)]
        keep = new.phy2log >= 0
        for path, _ in self._variables:
            if path[-1] in EXPERT_PARAMS:
                key, m = key_of(path), self.moe_index(path)
                self.params[key] = self._gather(self.params[key], jnp.asarray(src[m]), jnp.asarray(keep[m]))
        self.placement = new
        self.log2phy = self.put_replicated(new.log2phy)

    def set_active(self, active: np.ndarray):
        self.active = self.put_replicated(np.asarray(active, np.int32))

    @functools.cached_property
    def _gather(self):
        def gather(w, src, keep):
            out = w[src]
            return jnp.where(keep.reshape((-1,) + (1,) * (w.ndim - 1)), out, jnp.zeros_like(out))
        return jax.jit(gather, out_shardings=self._sharding(P(EP_AXIS)), donate_argnums=(0,))

    def put_replicated(self, arr):
        return jax.device_put(arr, self._sharding(P()))

    def put_batch(self, arr):
        return jax.device_put(arr, self._sharding(batch_spec()))
