"""One process, N local devices, one Mesh: the whole model step runs in shard_map over the "ep" axis.

Each rank holds the dense weights, `slots_per_rank` expert slots of every MoE layer, and its
`seqs_per_rank` KV-cache rows (data-parallel attention); the MoE layers exchange tokens with
all_to_all. Placement (log2phy) and the active-ranks mask are arguments of every compiled step, so
changing them never compiles again. After a failure, `survivors()` builds the runner of a new mesh
over the surviving devices from the arrays they already hold: dense weights and KV-cache shards are
rewrapped as they are (nothing copied), expert slots come from surviving replicas or the host backup."""
from __future__ import annotations

import functools
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..jax_compat import Portable, fresh_compile
from ..model.decoder import MoEModel
from ..model.loader import EXPERT_PARAMS, is_expert_path
from ..model.moe import EPContext
from ..model.sharding import EP_AXIS, batch_spec, param_spec
from ..placement import Placement
from ..placement.movement import KINDS, plan_move_arrays, plan_moves
from .base import Applied
from .controller import RankFailure, compact
from .fallbacks import FallbackPrograms
from .step import StepShape, empty_cache, input_rows, make_step, row_abstract


def key_of(path: tuple) -> str:
    return "/".join(map(str, path))


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: ModelConfig, num_slots: int, dtype):
    """(graphdef, [(path, abstract Param)]) of the model: traced once per shape, not per mesh."""
    abstract = nnx.eval_shape(lambda: MoEModel(cfg, num_slots, dtype))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return graphdef, tuple(nnx.to_flat_state(state))


class SpmdRunner:
    """Compiled steps, weights and KV cache of one model over one mesh of local devices.

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
        self.cache = None               # list of per-layer dicts of [N' * seqs, L, ...] arrays
        self._compiled = {}
        self.loader = None              # name -> a program loaded from another mesh of this size, or None
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

    def _rewrap(self, arr, new: "SpmdRunner", spec: P, rows_per_rank: int | None = None):
        """The survivors' shards of `arr` as one array over new's mesh (no copy); None if one is gone."""
        shards = {s.device: s.data for s in arr.addressable_shards}
        pieces = [shards[d] for d in new.devices]
        if any(p.is_deleted() for p in pieces):
            return None
        shape = arr.shape if rows_per_rank is None else (rows_per_rank * new.num_ranks,) + arr.shape[1:]
        return jax.make_array_from_single_device_arrays(shape, new._sharding(spec), pieces)

    def survivors(self, keep: list[int], placement: Placement, backup: dict[tuple, np.ndarray],
                  compiled: dict | None = None) -> tuple["SpmdRunner", dict]:
        """The runner of the mesh over self.devices[keep] with `placement` (over len(keep) ranks).

        Dense weights and the KV cache stay on the survivors' devices as they are; an expert slot keeps
        its weights when it already held that expert, else copies them from a surviving replica, else
        from `backup` (host memory, logical layout). Returns (runner, counts of moves by kind)."""
        new = SpmdRunner(self.cfg, self.dtype, [self.devices[k] for k in keep], placement, None, self.backend)
        if compiled:
            new._compiled.update(compiled)
        spr = placement.slots_per_rank
        alive = np.isin(np.arange(self.num_ranks), keep)
        # the move plan in this mesh's slot numbering: new rank i is old rank keep[i]
        widened = np.full((placement.num_layers, self.placement.num_slots), -1, np.int32)
        cols = np.nonzero(np.repeat(alive, spr))[0]
        widened[:, cols] = placement.phy2log
        plan = plan_move_arrays(self.placement.phy2log, widened, spr, alive)
        stats = {kind: int((plan["kind"] == i).sum()) for i, kind in enumerate(KINDS)}
        # only the slots that change are touched: a survivor whose slots all keep their expert keeps
        # its shard as it is (rewrapped); the others copy their shard through host memory once and
        # write the moved slots into it (no compilation on the recovery path)
        moving = plan["kind"] != 0
        by_layer: dict[int, list] = {}
        for m, slot, e, kind, src in zip(*(plan[k][moving].tolist() for k in ("layer", "slot", "expert", "kind",
                                                                              "source"))):
            by_layer.setdefault(m, []).append((slot, e, kind, src))
        params = {}
        for path, _ in self._variables:
            key = key_of(path)
            if not is_expert_path(path):
                params[key] = self._rewrap(self.params[key], new, P())
                continue
            moves = by_layer.get(self.moe_index(path), [])
            shards = {s.device: s.data for s in self.params[key].addressable_shards}
            targets = sorted({slot // spr for slot, *_ in moves})
            sources = sorted({src // spr for _, _, kind, src in moves if kind != 3} | set(targets))
            host = {r: np.asarray(shards[self.devices[r]]) for r in sources}
            blocks = {r: host[r].copy() for r in targets}
            for slot, e, kind, src in moves:
                r, j = divmod(slot, spr)
                blocks[r][j] = backup[path][e] if kind == 3 else host[src // spr][src % spr]
            pieces = [jax.device_put(blocks[r], self.devices[r]) if r in blocks else shards[self.devices[r]]
                      for r in keep]
            shape = (placement.num_slots,) + tuple(self.params[key].shape[1:])
            params[key] = jax.make_array_from_single_device_arrays(shape, new._sharding(param_spec(path)), pieces)
        new.params = params
        if self.cache is not None:
            rows = self.cache_rows_per_rank
            leaves = [self._rewrap(a, new, batch_spec(), rows) for a in jax.tree.leaves(self.cache)]
            if all(a is not None for a in leaves):
                new.cache = jax.tree.unflatten(jax.tree.structure(self.cache), leaves)
        return new, stats

    @property
    def cache_rows_per_rank(self) -> int:
        return jax.tree.leaves(self.cache)[0].shape[0] // self.num_ranks

    # -- programs -------------------------------------------------------------------------------
    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _param_specs(self):
        return {key_of(path): param_spec(path) for path, _ in self._variables}

    def _abstract_params(self):
        return {key_of(path): jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._sharding(param_spec(path)))
                for path, v in self._variables}

    def _abstract_cache(self, rows: int, cache_len: int):
        bs = self._sharding(batch_spec())
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bs),
                            jax.eval_shape(lambda: empty_cache(self.graphdef, self._variables, rows, cache_len)))

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
            # a program compiled for another mesh of this size, loaded here; else compiled
            compiled = (self.loader(name) if self.loader is not None else None) or fn.lower(*abstract_args).compile()
            with self._lock:
                self._compiled[name] = compiled
        finally:
            with self._lock:
                self._pending.pop(name, None)
            pending.set()
        return compiled

    def step_fn(self, shape: StepShape):
        """The compiled step of `shape` (per rank) over this mesh: (params, cache, *inputs over N' ranks
        (step.input_rows), log2phy, active, seq) -> (next [N' * out_rows], cache, counts [Lm, E]); the
        cache is donated."""
        body = make_step(self.graphdef, self._variables, key_of, shape, num_ranks=self.num_ranks,
                         slots_per_rank=self.slots_per_rank, backend=self.backend, axis_name=EP_AXIS)
        bs = batch_spec()
        cache_spec = jax.tree.map(lambda _: bs, jax.eval_shape(
            lambda: empty_cache(self.graphdef, self._variables, 1, 1)))
        rows = row_abstract(shape, self.num_ranks, self._sharding(bs))
        f = jax.jit(jax.shard_map(body, mesh=self.mesh,
                                  in_specs=(self._param_specs(), cache_spec) + (bs,) * len(rows) + (P(), P(), P()),
                                  out_specs=(bs, cache_spec, P()), check_vma=False), donate_argnums=(1,))
        return self._aot(shape, f, self._abstract_params(),
                         self._abstract_cache(shape.slots * self.num_ranks, shape.cache_len), *rows,
                         self._abstract(self.placement.log2phy.shape, jnp.int32, P()),
                         self._abstract((self.num_ranks,), jnp.int32, P()), self._abstract((), jnp.int32, P()))

    def score_fn(self, batch: int, seq: int):
        """(params, tokens [B, S], log2phy, active) -> (logits [B, S, V] float32, counts)."""
        def body(params, tokens, log2phy, active):
            model = nnx.merge(self.graphdef, nnx.from_flat_state(
                [(p, v.replace(params[key_of(p)])) for p, v in self._variables]))
            b, s = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            rank = jax.lax.axis_index(EP_AXIS)
            token_index = ((rank * b + jnp.arange(b, dtype=jnp.int32))[:, None] * 7919 + positions).reshape(-1)
            ctx = EPContext(log2phy=log2phy, active=active, token_index=token_index, valid=jnp.ones(b * s, bool),
                            num_ranks=self.num_ranks, slots_per_rank=self.slots_per_rank, axis_name=EP_AXIS,
                            backend=self.backend)
            hidden, _, counts = model(tokens, positions, model.empty_cache(b, s), ctx)
            return model.logits(hidden), counts
        f = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=(self._param_specs(), batch_spec(), P(), P()),
                                  out_specs=(batch_spec(), P()), check_vma=False))
        return self._aot(("score", batch, seq), f, self._abstract_params(),
                         self._abstract((batch, seq), jnp.int32, batch_spec()),
                         self._abstract(self.placement.log2phy.shape, jnp.int32, P()),
                         self._abstract((self.num_ranks,), jnp.int32, P()))

    def compiled_shapes(self) -> list:
        return list(self._compiled)

    def precompile(self, shapes: list, parallel: bool = False) -> dict:
        """Compiles the steps of these StepShapes; `parallel`: one thread each (XLA compiles outside
        the GIL, so two programs take about the time of one on two cores)."""
        if parallel and len(shapes) > 1:
            threads = [threading.Thread(target=self.step_fn, args=(s,)) for s in shapes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for s in shapes:
            self.step_fn(s)             # re-raises a compile error of a thread
        return {s: self._compiled[s] for s in shapes}

    # -- running steps ------------------------------------------------------------------------------
    def run(self, shape: StepShape, rows: dict, seq: int = 0, fetch=np.asarray):
        """One step: rows = input name (step.input_rows) -> numpy [N' * its rows (, chunk)]; the KV cache
        (made on first use) is updated in place. Returns (next tokens numpy [N' * out_rows], counts);
        fetch turns the sharded tokens into numpy (over processes: an allgather)."""
        if self.cache is None or self.cache_rows_per_rank != shape.slots:
            make = jax.jit(lambda: empty_cache(self.graphdef, self._variables, shape.slots * self.num_ranks,
                                               shape.cache_len), out_shardings=self._sharding(batch_spec()))
            self.cache = make()
        fn = self.step_fn(shape)
        nxt, self.cache, counts = fn(self.params, self.cache, *[self.put_batch(rows[k]) for k in input_rows(shape)],
                                     self.log2phy, self.active, np.int32(seq))
        return fetch(nxt), np.asarray(counts.addressable_data(0))

    # -- placement ------------------------------------------------------------------------------
    def set_placement(self, new: Placement):
        """Moves expert weights between slots so slot s holds new.phy2log[:, s], each copied from a
        slot that holds it now (both placements complete over this mesh)."""
        src = np.zeros_like(new.phy2log)
        for mv in plan_moves(self.placement.phy2log, new.phy2log, new.slots_per_rank,
                             np.ones(self.num_ranks, bool)):
            if mv.kind == "backup":
                raise ValueError(f"expert {mv.expert} of MoE layer {mv.layer} has no replica to copy from")
            src[mv.layer, mv.slot] = mv.source
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


def local_devices(num_ranks: int):
    """The first num_ranks devices (on CPU: fake devices asked for before JAX starts)."""
    devices = jax.devices()
    if len(devices) < num_ranks and devices[0].platform == "cpu":
        raise ValueError(
            f"num_ranks={num_ranks} needs {num_ranks} devices but JAX has {len(devices)}: call "
            f"jax.config.update('jax_num_cpu_devices', {num_ranks}) before the first use of JAX")
    if len(devices) < num_ranks:
        raise ValueError(f"num_ranks={num_ranks} needs {num_ranks} devices, only {len(devices)} present")
    return devices[:num_ranks]


class SpmdRuntime:
    """The Runtime of one process: a runner over the mesh of the live ranks' devices; an epoch is a new
    mesh over the survivors (weights and KV cache stay where they are, programs precompiled or loaded
    from another mesh of that size, else compiled)."""
    mode = "spmd"

    def __init__(self, cfg, dtype, num_ranks: int, placement: Placement, params: dict, backup: dict | None,
                 backend: str = "auto", precompile_fallbacks: bool = False, fallback_depth: int = 2):
        self.devices = local_devices(num_ranks)
        self.runner = SpmdRunner.create(cfg, dtype, self.devices, placement, params, backend)
        self.num_ranks, self.backup = num_ranks, backup or {}
        self.live = list(range(num_ranks))
        self.shapes: list[StepShape] = []
        self.fallbacks = FallbackPrograms(fallback_depth, self.devices) if precompile_fallbacks else None
        self._injected: list[int] = []

    def prepare(self, shapes: list[StepShape]) -> float:
        self.shapes = list(shapes)
        t = time.perf_counter()
        self.runner.precompile(self.shapes, parallel=True)
        return time.perf_counter() - t

    def prefill(self, batch):
        return self._run(batch)

    def decode(self, batch):
        return self._run(batch)

    def _run(self, batch):
        if self._injected:
            ranks, self._injected = self._injected, []
            raise RankFailure(ranks, "injected")
        try:
            return self.runner.run(batch.shape, batch.rows)
        except jax.errors.JaxRuntimeError as e:     # a lost device names itself in the error
            found = {int(m) for m in re.findall(r"[Dd]evice[ _:#]*(\d+)", str(e))}
            ranks = [self.live[i] for i in sorted(found) if i < len(self.live)]
            if not ranks:
                raise
            raise RankFailure(ranks, f"XLA runtime error: {e}") from e

    def after_good_step(self, decide):
        if self.fallbacks is None or not self.shapes:
            return
        run, shapes = self.runner, list(self.shapes)

        def compile_for(size: int, dead: list[int]):
            placement = decide(dead)
            if placement is None:
                return None
            keep = [r for r in self.live if r not in dead]
            alive = np.isin(np.arange(self.num_ranks), keep)
            shadow = SpmdRunner(run.cfg, run.dtype, [self.devices[k] for k in keep], compact(placement, alive),
                                None, run.backend)
            with fresh_compile():
                compiled = shadow.precompile(shapes)
            return {s: Portable(c, shadow.devices) for s, c in compiled.items()}
        self.fallbacks.start(list(self.live), shapes, compile_for)

    def apply_epoch(self, active: np.ndarray, placement: Placement, dead: list[int], fresh=()) -> Applied:
        self._injected = [r for r in self._injected if r not in dead]
        alive = np.asarray(active, bool)
        keep = np.nonzero(alive)[0].tolist()
        t = time.perf_counter()
        compiled = self.fallbacks.take(keep, self.shapes) if self.fallbacks is not None else None
        load_s = time.perf_counter() - t
        runner, moves = self.runner.survivors([self.live.index(r) for r in keep], compact(placement, alive),
                                              self.backup, compiled)
        if compiled is not None:        # the other shapes load from the same programs when first used
            runner.loader = self.fallbacks.loader_for(keep)
        self.runner, self.live = runner, keep
        compile_s = load_s if compiled is not None else self.prepare(self.shapes) if self.shapes else 0.0
        return Applied(moves, compile_s, compiled is not None, runner.cache is not None)

    def set_placement(self, active: np.ndarray, placement: Placement):
        alive = np.isin(np.arange(self.num_ranks), self.live)
        self.runner.set_placement(compact(placement, alive))
        self.runner.set_active(np.asarray(active, np.int32)[self.live])

    def inject(self, rank: int, how: str, delay_s: float = 1.0):
        if how != "kill":
            raise ValueError(f"mode='spmd' injects how='kill' only (got {how!r}); hang, slow and drop need "
                             f"mode='mooncake'")
        self._injected.append(int(rank))

    def restart(self, rank: int):
        raise ValueError("restart_rank needs mode='mooncake' (a lost device does not come back)")

    def idle(self, busy):
        if self.fallbacks is not None:
            self.fallbacks.free_when_idle(busy)

    def wait_fallbacks(self) -> int:
        return 0 if self.fallbacks is None else self.fallbacks.wait()

    def score(self, ids: np.ndarray, batch: int, seq: int) -> np.ndarray:
        padded = np.zeros((batch, seq), np.int32)
        padded[:ids.shape[0], :ids.shape[1]] = ids
        run = self.runner
        logits, _ = run.score_fn(batch, seq)(run.params, run.put_batch(padded), run.log2phy, run.active)
        return np.asarray(logits)[:ids.shape[0], :ids.shape[1]]

    def close(self):
        if self.fallbacks is not None:
            self.fallbacks.close()
        self.runner = None
