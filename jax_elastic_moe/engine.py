"""The Python API: Engine.from_pretrained / from_config, score, generate, placement."""
from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import re
import threading
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, ModelConfig, from_hf_dict, read_config_dict
from .metrics import EngineMetrics
from .model.loader import load_checkpoint, random_params
from .placement import Placement, PlacementError, rebalance, validate
from .runtime.controller import Controller, EngineDead, RankFailure, RecoveryRecord, compact
from .runtime.spmd import Portable, SpmdRunner

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]            # generated tokens (the stop token included when one ended it)
    prompt_token_ids: list[int]
    finish_reason: str              # "stop" | "length"
    text: str | None = None         # decoded generated tokens, when the model has a tokenizer


def _bucket(n: int, minimum: int = 8) -> int:
    """Next power of two >= n (shapes come in few sizes, so few compilations)."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def resolve_preset(name: str) -> str:
    """A preset path, or a bare name ("tiny") looked up in configs/."""
    if os.path.exists(name):
        return name
    for cand in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yaml")):
        if os.path.exists(cand):
            return cand
    raise ConfigError(f"config preset not found: {name} (looked in . and {CONFIG_DIR})")


def local_devices(num_ranks: int):
    """The first num_ranks devices; on CPU, asks JAX for that many fake devices if it can."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    devices = jax.devices()
    if len(devices) < num_ranks and devices[0].platform == "cpu":
        raise ValueError(
            f"num_ranks={num_ranks} needs {num_ranks} devices but JAX has {len(devices)}: call "
            f"jax.config.update('jax_num_cpu_devices', {num_ranks}) before the first use of JAX")
    if len(devices) < num_ranks:
        raise ValueError(f"num_ranks={num_ranks} needs {num_ranks} devices, only {len(devices)} present")
    return devices[:num_ranks]


def enable_compilation_cache(path: str):
    """JAX's persistent compilation cache in `path`, for every program however fast it compiled."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    out: list[int] = dataclasses.field(default_factory=list)
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt + self.out


class Engine:
    """Batch inference of a MoE model with expert parallelism over `num_ranks` ranks.

    Physical expert slots = logical experts + redundant_experts, spread evenly over the ranks. When a
    rank fails, the controller decides a new epoch over the survivors, the runtime applies it (spmd: a
    new mesh over the surviving devices, resharded weights, recompiled steps) and the interrupted step
    runs again; requests keep their tokens so far."""

    def __init__(self, cfg: ModelConfig, params: dict, *, num_ranks: int = 1, redundant_experts: int = 0,
                 dtype: str = "float32", tokenizer=None, placement_policy: str = "round_robin",
                 recovery_policy: str = "deepseek_global", max_batch_size: int = 64, load_window: int = 64,
                 backup: str | None = "host", precompile_fallbacks: bool = False,
                 compilation_cache_dir: str | None = None, mode: str = "spmd", source: dict | None = None,
                 exchange_timeout: float = 1.0, heartbeat_interval: float = 0.2, heartbeat_timeout: float = 3.0,
                 spawn_workers: bool = True, controller_endpoint: str = "tcp://127.0.0.1:0",
                 ep_backend: str = "auto", metrics_port: int | None = None, fallback_depth: int = 2):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
        if mode not in ("spmd", "mooncake"):
            raise ValueError(f"mode must be 'spmd' or 'mooncake', got {mode!r}")
        if mode == "mooncake" and source is None:
            raise ValueError("mode='mooncake' needs the model's source: use Engine.from_config / from_pretrained")
        if backup not in ("host", None):
            raise ValueError(f"backup must be 'host' or None, got {backup!r}")
        num_slots = cfg.num_experts + redundant_experts
        if num_slots % num_ranks:
            raise ValueError(
                f"{cfg.num_experts} experts + redundant_experts={redundant_experts} = {num_slots} slots do not "
                f"divide evenly over num_ranks={num_ranks}")
        if compilation_cache_dir:
            enable_compilation_cache(compilation_cache_dir)
        self.cfg, self.dtype, self.tokenizer = cfg, dtype, tokenizer
        self.num_ranks, self.redundant_experts = num_ranks, redundant_experts
        self.slots_per_rank = num_slots // num_ranks
        self.max_replicas = redundant_experts + 1
        self.max_batch_size = max_batch_size
        self.mode = mode
        self._loads = collections.deque(maxlen=load_window)
        self._closed = False
        self._dead: EngineDead | None = None
        self._controller = Controller(num_ranks, self.slots_per_rank, self.max_replicas, recovery_policy)
        placement = self._fit(rebalance(np.ones((cfg.num_moe_layers, cfg.num_experts)), num_ranks,
                                        self.slots_per_rank, policy=placement_policy))
        self._mesh_ranks = list(range(num_ranks))       # global rank of each live rank's device
        self._active = np.ones(num_ranks, np.int32)
        self._placement = placement
        self._backup = ({p: a for p, a in params.items() if p[-1] in ("w_gate", "w_up", "w_down")}
                        if backup == "host" else None)
        if mode == "spmd":
            self._devices = local_devices(num_ranks)
            self._runner = SpmdRunner.create(cfg, DTYPES[dtype], self._devices, placement, params, ep_backend)
        else:
            from .runtime.mooncake import MooncakeRuntime
            self._devices = []
            self._runner = MooncakeRuntime(cfg, source, dtype, num_ranks, placement, self._backup,
                                           exchange_timeout=exchange_timeout, heartbeat_interval=heartbeat_interval,
                                           heartbeat_timeout=heartbeat_timeout, spawn=spawn_workers,
                                           endpoint=controller_endpoint, backend=ep_backend)
        self._failures: list[tuple] = []      # (rank, how, at_step, delay_s) injected, not yet fired
        self._fail_lock = threading.Lock()
        self._precompile = precompile_fallbacks
        self._fallbacks: dict[frozenset, dict] = {}     # survivor ranks -> steps loaded on their devices
        self._portable: dict[int, dict] = {}            # mesh size -> {step shape: Portable}
        self._stale: list[dict] = []                    # loaded steps no longer of use, to free
        self._fallbacks_for: tuple | None = None        # (survivors, step shapes) the fallbacks are for
        self._busy = False                              # inside generate()
        self._freer: threading.Thread | None = None
        self._cancel_fallbacks = threading.Event()
        self._fallback_thread: threading.Thread | None = None
        self._pending_record: tuple[RecoveryRecord, float, float] | None = None
        self._last_good = time.perf_counter()
        self._batch_shapes: list = []
        self.step_log: list[tuple[float, int]] = []    # (time.perf_counter() at the end, tokens made)
        self.transient_retries = 0          # steps run again after a timeout with nobody dead
        self.fallback_depth = fallback_depth  # programs ready for up to this many more failures
        self._exchange_timeout = exchange_timeout
        self.metrics = None if metrics_port is None else EngineMetrics(num_ranks, metrics_port)   # 0: a free port
        self.metrics_port = None if self.metrics is None else self.metrics.port

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, num_ranks: int = 1, redundant_experts: int = 0,
                        dtype: str = "float32", **kw) -> "Engine":
        """Loads a Hugging Face checkpoint directory (config.json + *.safetensors [+ tokenizer.json])."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        cfg, params = load_checkpoint(path, DTYPES[dtype])
        kw.setdefault("source", {"config": read_config_dict(os.path.join(path, "config.json")),
                                 "checkpoint": os.path.abspath(path)})
        tok = None
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return cls(cfg, params, num_ranks=num_ranks, redundant_experts=redundant_experts, dtype=dtype,
                   tokenizer=tok, **kw)

    @classmethod
    def from_config(cls, preset: str, *, num_ranks: int = 1, redundant_experts: int = 0, seed: int = 0,
                    dtype: str = "float32", **kw) -> "Engine":
        """Random weights for a preset (configs/<name>.yaml, or a path to a YAML / config.json)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        raw = read_config_dict(resolve_preset(preset))
        try:
            cfg = from_hf_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{resolve_preset(preset)}: {e}") from None
        kw.setdefault("source", {"config": raw, "seed": seed})
        return cls(cfg, random_params(cfg, DTYPES[dtype], seed), num_ranks=num_ranks,
                   redundant_experts=redundant_experts, dtype=dtype, **kw)

    def close(self):
        if self._fallback_thread is not None:
            self._fallback_thread.join()
        self._stale.clear()
        self._fallbacks.clear()
        if self.mode == "mooncake" and self._runner is not None:
            self._runner.close()
        self._closed = True
        self._runner = None
        if self.metrics is not None:
            self.metrics.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._dead is not None:
            raise EngineDead(f"the engine has stopped: {self._dead}")
        if self._closed:
            raise RuntimeError("the engine is closed")

    # -- placement ----------------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        """The current placement in global rank numbering (a dead rank's slots are empty)."""
        return self._placement

    @property
    def active(self) -> np.ndarray:
        """[num_ranks] int32: 1 for the ranks taking part in the current epoch."""
        return self._active.copy()

    @property
    def alive(self) -> np.ndarray:
        """[num_ranks] bool: ranks not lost to a failure."""
        return self._controller.alive.copy()

    def _fit(self, p: Placement) -> Placement:
        if p.num_ranks != self.num_ranks or p.slots_per_rank != self.slots_per_rank:
            raise PlacementError(f"placement is for {p.num_ranks} ranks x {p.slots_per_rank} slots, the engine "
                                 f"has {self.num_ranks} x {self.slots_per_rank}")
        if p.num_layers != self.cfg.num_moe_layers or p.num_logical != self.cfg.num_experts:
            raise PlacementError(f"placement covers {p.num_layers} layers x {p.num_logical} experts, the model "
                                 f"has {self.cfg.num_moe_layers} x {self.cfg.num_experts}")
        if p.logcnt.max(initial=0) > self.max_replicas:
            raise PlacementError(f"an expert has {p.logcnt.max()} replicas; at most {self.max_replicas} fit")
        return p if p.max_replicas == self.max_replicas else p.with_max_replicas(self.max_replicas)

    def _check_live(self, p: Placement, active: np.ndarray):
        live = p.live_logcnt(active.astype(bool))
        if (live < 1).any():
            layer, expert = np.argwhere(live < 1)[0]
            raise PlacementError(f"logical expert {expert} of MoE layer {layer} has no replica on an active rank")

    def set_placement(self, p: Placement):
        """Installs any valid placement: expert weights move between slots; nothing recompiles."""
        self._check_open()
        p = self._fit(validate(p, self.alive))
        self._check_live(p, self._active)
        if self.mode == "spmd":
            self._runner.set_placement(compact(p, self.alive))
        else:
            self._runner.install(self._active, p)
        self._placement = p

    def set_active(self, active: Sequence[int]):
        """Sets the active-ranks mask (int 0/1 per rank): inactive ranks receive no tokens."""
        self._check_open()
        active = np.asarray(active, np.int32)
        if active.shape != (self.num_ranks,) or not np.isin(active, (0, 1)).all():
            raise ValueError(f"active must be {self.num_ranks} values of 0 or 1, got {active.tolist()}")
        if (active.astype(bool) & ~self.alive).any():
            raise ValueError(f"ranks {np.nonzero(active.astype(bool) & ~self.alive)[0].tolist()} are dead")
        self._check_live(self._placement, active)
        self._active = active
        if self.mode == "spmd":
            self._runner.set_active(active[self._mesh_ranks])
        else:
            self._runner.install(active, self._placement)
            self._mesh_ranks = list(self._runner.live)

    def rebalance(self, policy: str | None = None) -> Placement:
        """Re-places experts from the measured loads (expert_loads) over the alive ranks, staying close
        to the current placement; expert weights move between slots, nothing recompiles."""
        self._check_open()
        p = rebalance(self.expert_loads().astype(np.float64) + 1.0, self.num_ranks, self.slots_per_rank,
                      policy=policy or self._controller.policy, alive=self.alive, previous=self._placement,
                      max_replicas=self.max_replicas)
        self.set_placement(p)
        return p

    def expert_loads(self) -> np.ndarray:
        """[Lm, E] tokens routed to each logical expert over the last steps (the load window)."""
        if not self._loads:
            return np.zeros((self.cfg.num_moe_layers, self.cfg.num_experts), np.int64)
        return np.sum(self._loads, axis=0)

    # -- failures -----------------------------------------------------------------------------------
    def fail_rank(self, rank: int, how: str = "kill", at_step: int | None = None, delay_s: float = 1.0):
        """Injects the failure of `rank`: now, or when generation step `at_step` starts (step 0 =
        prefill, k = the k-th decode step of a generate call); may be called from another thread
        while generate runs. how: "kill" (SIGKILL), "hang" (SIGSTOP), "slow" (its exchanges start
        delay_s late), "drop" (its transfers fail). spmd mode loses the rank's device (kill only)."""
        hows = ("kill",) if self.mode == "spmd" else ("kill", "hang", "slow", "drop")
        if how not in hows:
            raise ValueError(f"mode={self.mode!r} injects how in {hows} (got {how!r}); "
                             f"hang, slow and drop need mode='mooncake'")
        if not 0 <= rank < self.num_ranks or not self.alive[rank]:
            raise ValueError(f"rank {rank} is not a live rank (alive: {np.nonzero(self.alive)[0].tolist()})")
        if self.mode == "mooncake" and at_step is None and how in ("kill", "hang"):
            self._runner.inject(rank, how)          # a signal: safe from any thread, fires now
            return
        with self._fail_lock:
            self._failures.append((int(rank), how, at_step, delay_s))

    def _due_failures(self, step: int):
        """Fires the injected failures due at `step` (spmd: the device is lost, the step fails;
        mooncake: the fault is applied to the worker and the step finds it)."""
        with self._fail_lock:
            due = [f for f in self._failures if f[2] is None or f[2] <= step]
            self._failures = [f for f in self._failures if not (f[2] is None or f[2] <= step)]
        if not due:
            return
        if self.mode == "spmd":
            raise RankFailure([r for r, *_ in due], "injected")
        for rank, how, _, delay_s in due:
            self._runner.inject(rank, how, delay_s)

    @staticmethod
    def _ranks_named(error: Exception, mesh_ranks: list[int]) -> list[int]:
        """Ranks named by an XLA runtime error ("... device 3 ..."), in global numbering."""
        found = {int(m) for m in re.findall(r"[Dd]evice[ _:#]*(\d+)", str(error))}
        return [mesh_ranks[i] for i in sorted(found) if i < len(mesh_ranks)]

    def stats(self) -> dict:
        """The epoch, active ranks, and one record per recovery."""
        return {"mode": self.mode, "epoch": self._controller.epoch.number,
                "active_ranks": np.nonzero(self._active)[0].tolist(),
                "alive_ranks": np.nonzero(self.alive)[0].tolist(), "transient_retries": self.transient_retries,
                "recoveries": [r.as_dict() for r in self._controller.records]}

    def _recover(self, failure: RankFailure, requeued: int):
        """Applies the controller's decision for `failure` (spmd: a new mesh over the survivors)."""
        t0 = time.perf_counter()
        rec = RecoveryRecord(epoch=0, failed_ranks=failure.ranks, detect_s=failure.detected_at - failure.failed_at,
                             requests_requeued=requeued, evidence=failure.reason[:500])
        if self.metrics is not None:
            self.metrics.on_recovering()
        try:
            epoch, placement = self._controller.decide(failure.ranks, self.expert_loads(), self._placement)
        except EngineDead as e:
            e = EngineDead(f"{e} (evidence: {failure.reason[:300]})")
            self._dead = e
            if self.metrics is not None:
                self.metrics.on_dead()
            raise e from None
        t1 = time.perf_counter()
        rec.decide_s, rec.epoch = t1 - t0, epoch.number
        alive = epoch.active.astype(bool)
        keep_ranks = np.nonzero(alive)[0].tolist()
        if self.mode == "spmd":
            self._cancel_fallbacks.set()        # a fallback not ready now is compiled here instead
            compiled = self._fallbacks.pop(frozenset(keep_ranks), None)
            if compiled is None:                # compiled for another set of this size: load it here
                compiled = self._load_portable([self._devices[r] for r in keep_ranks], self._batch_shapes)
                rec.compile_s = time.perf_counter() - t1
            rec.precompiled = compiled is not None
            runner, moved = self._runner.survivors([self._mesh_ranks.index(r) for r in keep_ranks],
                                                   compact(placement, alive), self._backup or {}, compiled)
        else:
            runner, compiled = self._runner, None
            runner.fence(failure.ranks)
            moved = runner.install(epoch.active, placement)
        rec.moved_experts = moved["peer"] + moved["backup"] + moved.get("local", 0)
        rec.restored_from_backup = moved["backup"]
        self._controller.install(epoch)
        self._runner, self._mesh_ranks, self._placement = runner, keep_ranks, placement
        self._active = epoch.active.copy()
        # programs loaded for survivor sets inside the new one stay ready for the next failure; the
        # others are freed when the engine is idle (freeing one takes ~15 ms, holding the GIL)
        self._stale += [self._fallbacks.pop(k) for k in list(self._fallbacks) if not k <= set(keep_ranks)]
        rec.restore_s = time.perf_counter() - t1 - rec.compile_s
        if compiled is None and self._batch_shapes:
            rec.compile_s = runner.ensure_compiled([self._resume_shape(n, len(keep_ranks))
                                                    for n in self._batch_shapes])
        self._controller.records.append(rec)
        self._pending_record = (rec, time.perf_counter(), failure.failed_at)

    def _load_portable(self, devices: list, shapes: list) -> dict | None:
        """The steps of a batch (`shapes`, as _batch_shapes) loaded onto `devices` from programs compiled
        for another mesh of that size; None when some step was never compiled for that size."""
        names = [self._resume_shape(n, len(devices)) for n in shapes]
        ready = self._portable.get(len(devices), {})
        if not names or any(n not in ready for n in names):
            return None
        try:
            return {n: ready[n].load(devices) for n in names}
        except Exception as e:              # an executable this jaxlib cannot move: compile instead
            warnings.warn(f"precompiled steps could not be loaded onto new devices ({e!r}); compiling")
            return None

    def _start_fallbacks(self, shapes: list):
        """In the background: compiles the steps once per mesh size that up to fallback_depth more
        failures would leave, then loads them onto the devices of every set of survivors one failure
        away, and two or more away while that stays under 64 sets; a set not loaded in advance is
        loaded when its failure comes (a fraction of a second), not compiled."""
        if not self._precompile or self._fallback_thread is not None and self._fallback_thread.is_alive():
            return
        alive = np.nonzero(self.alive)[0].tolist()
        key = (tuple(alive), tuple(shapes))
        if key == self._fallbacks_for:
            return                          # done for these survivors and step shapes
        loads, placement, devices = self.expert_loads(), self._placement, self._devices
        self._cancel_fallbacks = cancel = threading.Event()
        depth = min(self.fallback_depth, len(alive) - 1)

        def compile_size(m: int) -> bool:
            """Programs for len(alive) - m devices, compiled on the first m-failure the controller can serve."""
            size = len(alive) - m
            names = [self._resume_shape(n, size) for n in shapes]
            have = self._portable.setdefault(size, {})
            if all(n in have for n in names):
                return True
            for dead in itertools.islice(itertools.combinations(alive[::-1], m), 16):
                try:
                    _, p = self._controller.decide(list(dead), loads, placement)
                except EngineDead:
                    continue
                keep = [r for r in alive if r not in dead]
                shadow = SpmdRunner(self.cfg, DTYPES[self.dtype], [devices[k] for k in keep],
                                    compact(p, np.isin(np.arange(self.num_ranks), keep)), None,
                                    self._runner.backend)
                try:
                    for name, compiled in shadow.precompile(names).items():
                        have[name] = Portable(compiled, shadow.devices)
                except Exception as e:      # a program that cannot be serialized: compile at the failure
                    warnings.warn(f"fallback programs for {size} devices not prepared ({e!r})")
                    return False
                return True
            return False

        def work():
            sizes = [m for m in range(1, depth + 1) if not cancel.is_set() and compile_size(m)]
            budget = 64
            for m in sizes:
                for dead in itertools.combinations(alive, m):
                    if cancel.is_set():
                        return
                    if m > 1 and budget <= 0:
                        break
                    keep = frozenset(alive) - set(dead)
                    if keep not in self._fallbacks:
                        got = self._load_portable([devices[k] for k in sorted(keep)], shapes)
                        if got is None:
                            break
                        self._fallbacks[keep] = got
                        budget -= m > 1
            self._fallbacks_for = key
        self._fallback_thread = threading.Thread(target=work, daemon=True, name="jem-precompile")
        self._fallback_thread.start()

    def wait_fallbacks(self) -> int:
        """Waits for the background precompilation; returns how many fallback meshes (spmd) or
        shape sets (mooncake) are ready."""
        if self.mode == "mooncake":
            return self._runner.fallbacks_ready()
        if self._fallback_thread is not None:
            self._fallback_thread.join()
        return len(self._fallbacks)

    def restart_rank(self, rank: int):
        """Brings a failed rank back (mooncake mode): a fresh worker joins at a step boundary, gets
        slots by a rebalance that stays close to the current placement, loads their weights from
        its peers (or the host backup), and takes load from the next batch on."""
        self._check_open()
        if self.mode != "mooncake":
            raise ValueError("restart_rank needs mode='mooncake' (a lost device does not come back)")
        if not 0 <= rank < self.num_ranks or self.alive[rank]:
            raise ValueError(f"rank {rank} is not a dead rank")
        self._runner.restart(rank)
        alive = self.alive
        alive[rank] = True
        p = rebalance(self.expert_loads().astype(np.float64) + 1.0, self.num_ranks, self.slots_per_rank,
                      policy=self._controller.policy, alive=alive, previous=self._placement,
                      max_replicas=self.max_replicas)
        self._runner.install(alive.astype(np.int32), p, fresh={rank})
        epoch = self._controller.epoch
        self._controller.install(type(epoch)(epoch.number + 1, alive.astype(np.int32), epoch.placement_version + 1))
        self._placement, self._active = p, alive.astype(np.int32)
        self._mesh_ranks = np.nonzero(alive)[0].tolist()

    def _batch_pad(self, b: int, ranks: int | None = None) -> int:
        n = ranks or len(self._mesh_ranks)
        return -(-_bucket(b, 1) // n) * n

    def _resume_shape(self, name, ranks: int):
        """The step shapes a batch takes after a failure leaves `ranks` devices (prefill over the cache)."""
        kind, batch, *rest = name
        cache_len = rest[-1]
        padded = self._batch_pad(batch, ranks)
        return ("prefill", padded, cache_len, cache_len) if kind == "prefill" else (kind, padded, cache_len)

    # -- inputs -------------------------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer (tokenizer.json in the checkpoint)")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError("empty prompt: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return ids

    # -- compute ------------------------------------------------------------------------------------
    def score(self, token_ids) -> np.ndarray:
        """Full-sequence forward. token_ids [B, S] ints -> float32 logits [B, S, V] (mode spmd)."""
        self._check_open()
        if self.mode != "spmd":
            raise ValueError("score() runs in mode='spmd'; mode='mooncake' serves generate()")
        ids = np.asarray(token_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.cfg.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        b, s = ids.shape
        bp, sp = self._batch_pad(b), _bucket(s)
        padded = np.zeros((bp, sp), np.int32)
        padded[:b, :s] = ids
        run = self._runner
        logits, _ = run.score_fn(bp, sp)(run.params, run.put_batch(padded), run.log2phy, run.active)
        return np.asarray(logits)[:b, :s]

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                 progress: bool = False) -> list[GenerationResult]:
        """Generates up to max_new_tokens for each prompt (token id lists, or strings with a tokenizer).
        stop_token_ids: default the model's eos ids; [] disables stopping. A rank failure during the
        call is recovered from and the interrupted step run again; the results are the same."""
        self._check_open()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            prompts = list(prompts) if not isinstance(prompts, (str, bytes)) else [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        reqs = [_Request(i, self._encode(p)) for i, p in enumerate(prompts)]
        stops = set(self.cfg.eos_token_id if stop_token_ids is None else stop_token_ids)
        sampling = (int(seed), float(temperature), float(top_p))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs) * max_new_tokens, desc="generate", unit="tok")
        self._step = 0
        self._last_good = time.perf_counter()
        self._busy = True
        try:
            self._generate(reqs, max_new_tokens, sampling, stops, bar)
        finally:
            self._busy = False
            self._free_stale_when_idle()
        if bar is not None:
            bar.close()
        results = [GenerationResult(token_ids=r.out, prompt_token_ids=r.prompt,
                                    finish_reason="stop" if r.out and r.out[-1] in stops else "length")
                   for r in reqs]
        if self.tokenizer is not None:
            for r in results:
                r.text = self.tokenizer.decode(r.token_ids)
        return results

    def _free_stale_when_idle(self):
        """Frees, in the background, the programs of survivor sets no failure can leave any more, one
        at a time while no generate() runs (each holds the GIL ~15 ms: never on a serving path)."""
        def free():
            while self._stale and not self._busy:
                try:
                    self._stale.pop()
                except IndexError:          # emptied by close()
                    return
                time.sleep(0.005)
        if self._stale and (self._freer is None or not self._freer.is_alive()):
            self._freer = threading.Thread(target=free, daemon=True, name="jem-free-programs")
            self._freer.start()

    def _generate(self, reqs, max_new_tokens, sampling, stops, bar):
        for start in range(0, len(reqs), self.max_batch_size):
            chunk = reqs[start:start + self.max_batch_size]
            cache_len = _bucket(_bucket(max(len(r.prompt) for r in chunk)) + max_new_tokens)
            retries = 0
            while not all(r.done for r in chunk):
                live = [r for r in chunk if not r.done]
                try:
                    self._run_batch(live, cache_len, max_new_tokens, sampling, stops, bar)
                except RankFailure as f:
                    if f.ranks:
                        self._recover(f, requeued=len(live))
                        retries = 0
                        continue
                    # a step timed out but every rank is alive (compute skew): run it again, with the
                    # peer tables re-installed (a transport marks a peer failed after a timed-out write)
                    retries += 1
                    self.transient_retries += 1
                    if self.mode == "mooncake":
                        self._runner.install(self._active, self._placement, loads={})
                    if retries > 5:
                        raise RuntimeError(f"steps keep timing out with every rank alive ({f.reason}); "
                                           f"raise exchange_timeout (now {self._exchange_timeout} s)") from f

    def _good_step(self, tokens: int):
        now = time.perf_counter()
        self.step_log.append((now, tokens))
        if self.metrics is not None:
            self.metrics.on_step(now - self._last_good, tokens)
        if self._pending_record is not None:
            rec, restored_at, failed_at = self._pending_record
            rec.compile_s += self._runner_compile_s
            rec.resume_s = now - restored_at - self._runner_compile_s
            rec.total_s = now - min(failed_at, self._last_good)
            self._pending_record = None
            if self.metrics is not None:
                self.metrics.on_recovered(int(self._active.sum()), rec.total_s)
        self._last_good = now

    def _run_batch(self, reqs, cache_len, max_new, sampling, stops, bar):
        """Prefill (prompt + tokens so far) then decode `reqs` until each is done."""
        rt = self._runner
        self._runner_compile_s = 0.0
        b, bp = len(reqs), self._batch_pad(len(reqs))
        resumed = any(r.out for r in reqs)
        seq = cache_len if resumed else _bucket(max(len(r.context) for r in reqs))
        tokens = np.zeros((bp, seq), np.int32)
        lens = np.ones(bp, np.int32)
        for i, r in enumerate(reqs):
            tokens[i, :len(r.context)] = r.context
            lens[i] = len(r.context)

        def sample_ids():
            ids = np.zeros(bp, np.int32)
            ids[:b] = [(r.id * 1_000_003 + len(r.out)) % (2 ** 31) for r in reqs]
            return ids

        self._batch_shapes = [("prefill", bp, seq, cache_len), ("decode", bp, cache_len)]
        if self.mode == "mooncake":
            # with the programs for one fewer rank, before any step; not while resuming from a
            # failure (that would lengthen the interruption): the next batch compiles them
            fallback = [] if resumed else [
                ([self._resume_shape(n, rt.num_live - m) for n in self._batch_shapes], rt.num_live - m)
                for m in range(1, self.fallback_depth + 1) if rt.num_live - m >= 1]
            self._runner_compile_s = rt.ensure_compiled(self._batch_shapes, fallback)
        else:
            self._runner_compile_s = rt.ensure_compiled(self._batch_shapes)
        self._due_failures(self._step)
        nxt, counts = self._guarded(rt.prefill, tokens, lens, sample_ids(), cache_len, sampling)
        done = np.zeros(bp, bool)
        done[b:] = True
        positions = lens.copy()
        # Fallbacks start after the first step of a batch, never in one resumed after a failure: the
        # programs one more failure needs were compiled (fallback_depth 2) before the failure, and the
        # next ones would compete with serving for the host right after the recovery.
        fallbacks = self._precompile and self.mode == "spmd" and not resumed
        while True:
            self._good_step(int((~done).sum()))
            if fallbacks:
                self._start_fallbacks(self._batch_shapes)
                fallbacks = False
            self._loads.append(counts)
            for i, r in enumerate(reqs):
                if not r.done:
                    r.out.append(int(nxt[i]))
                    if bar is not None:
                        bar.update(1)
                    if nxt[i] in stops or len(r.out) >= max_new:
                        r.done = done[i] = True
            if done.all():
                return
            self._step += 1
            self._due_failures(self._step)
            nxt, counts = self._guarded(rt.decode, nxt.astype(np.int32), positions, ~done, sample_ids(), sampling)
            positions = positions + 1

    def _guarded(self, fn, *args):
        """Runs a step; an XLA runtime error that names a device becomes a RankFailure."""
        try:
            return fn(*args)
        except jax.errors.JaxRuntimeError as e:
            ranks = self._ranks_named(e, self._mesh_ranks)
            if not ranks:
                raise
            raise RankFailure(ranks, f"XLA runtime error: {e}") from e
