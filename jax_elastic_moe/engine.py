"""The Python API: a thin layer over the Scheduler (requests, continuous batching), the Controller
(membership, epochs, placement, recovery, rejoin) and a Runtime (spmd or mooncake)."""
from __future__ import annotations

import os
import weakref
from typing import Sequence

import numpy as np

from .config import DTYPES, ConfigError, ModelConfig, from_hf_dict, read_config_dict, resolve_preset
from .inputs import make_requests
from .jax_compat import enable_compilation_cache
from .kinds import EP_BACKENDS, SPMD_FAILURES, Backend, FailureKind, Mode
from .metrics import EngineMetrics
from .model.loader import is_expert_path, load_checkpoint, random_params
from .placement import Placement, rebalance, validate
from .runtime.controller import Controller, EngineDead
from .scheduler import Scheduler
from .serving import ServingLoop
from .settings import (ADMISSION, GenerationResult, check_engine, check_token_array,
                       positive, serving_sizes)

__all__ = ["Engine", "GenerationResult"]


class Engine:
    """Inference of a MoE model with expert parallelism over `num_ranks` ranks.

    Physical expert slots = logical experts + redundant_experts, spread evenly over the ranks. Each
    rank holds `seqs_per_rank` KV-cache slots of `max_model_len` positions; requests are admitted into
    free slots as others finish, long prompts prefilled in chunks of up to `prefill_chunk` tokens
    (`prefill_rows` per rank per step). When a rank fails, the controller decides a new epoch over the
    survivors, the runtime applies it, and only the dead rank's requests are prefilled again."""

    def __init__(self, cfg: ModelConfig, params: dict, *, num_ranks: int = 1, redundant_experts: int = 0,
                 dtype: str = "float32", tokenizer=None, placement_policy: str = "round_robin",
                 recovery_policy: str = "deepseek_global", seqs_per_rank: int = 8, max_model_len: int | None = None,
                 prefill_chunk: int = 256, prefill_rows: int | None = None, admission: str = "continuous",
                 load_window: int = 64, backup: str | None = "host", precompile_fallbacks: bool = False,
                 compilation_cache_dir: str | None = None, mode: str = "spmd", source: dict | None = None,
                 exchange_timeout: float = 1.0, heartbeat_interval: float = 0.2, heartbeat_timeout: float = 3.0,
                 spawn_workers: bool = True, controller_endpoint: str = "tcp://127.0.0.1:0",
                 ep_backend: str = "auto", metrics_port: int | None = None, fallback_depth: int = 2):
        check_engine(cfg, num_ranks, redundant_experts, dtype, mode, source, backup, admission)
        mode, ep_backend = Mode.parse(mode, "mode"), Backend.parse(ep_backend, "ep_backend", EP_BACKENDS)
        self.seqs_per_rank, self.max_model_len, prefill_chunk, prefill_rows = serving_sizes(
            cfg, seqs_per_rank, max_model_len, prefill_chunk, prefill_rows)
        if compilation_cache_dir:
            enable_compilation_cache(compilation_cache_dir)
        self.cfg, self.dtype, self.tokenizer, self.mode = cfg, dtype, tokenizer, mode
        self.num_ranks, self.redundant_experts = num_ranks, redundant_experts
        self.slots_per_rank = (cfg.num_experts + redundant_experts) // num_ranks
        self.max_replicas = redundant_experts + 1
        self._closed, self._busy = False, False
        self._controller = ctl = Controller(num_ranks, self.slots_per_rank, self.max_replicas, recovery_policy)
        ctl.placement = self._fit(rebalance(np.ones((cfg.num_moe_layers, cfg.num_experts)), num_ranks,
                                            self.slots_per_rank, policy=placement_policy))
        self._backup = {p: a for p, a in params.items() if is_expert_path(p)} if backup == "host" else None
        if mode == Mode.SPMD:
            from .runtime.spmd import SpmdRuntime
            self._runtime = SpmdRuntime(cfg, DTYPES[dtype], num_ranks, ctl.placement, params, self._backup,
                                        ep_backend, precompile_fallbacks, fallback_depth)
        else:
            from .runtime.mooncake import MooncakeRuntime
            self._runtime = MooncakeRuntime(cfg, source, dtype, num_ranks, ctl.placement, self._backup,
                                            exchange_timeout=exchange_timeout, heartbeat_interval=heartbeat_interval,
                                            heartbeat_timeout=heartbeat_timeout, spawn=spawn_workers,
                                            endpoint=controller_endpoint, backend=ep_backend,
                                            max_rows=self.seqs_per_rank + prefill_rows * prefill_chunk,
                                            params=params)
        # a dropped engine (no close()) still stops what its runtime started (worker processes)
        self._finalizer = weakref.finalize(self, self._runtime.close)
        self._scheduler = Scheduler(self._runtime.live, self.seqs_per_rank, prefill_rows, prefill_chunk,
                                    self.max_model_len, admission)
        self.metrics = None if metrics_port is None else EngineMetrics(num_ranks, metrics_port)   # 0: a free port
        self.metrics_port = None if self.metrics is None else self.metrics.port
        self._loop = ServingLoop(self._scheduler, self._runtime, ctl, load_window=load_window, metrics=self.metrics,
                                 exchange_timeout=exchange_timeout)
        self.step_log = self._loop.step_log            # (time.perf_counter() at the end, tokens made)
        self.last_requests: list = []                  # the scheduler's requests of the last generate()

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
        path = resolve_preset(preset)
        raw = read_config_dict(path)
        try:
            cfg = from_hf_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        check_engine(cfg, num_ranks, redundant_experts, dtype, kw.get("mode", "spmd"), {},
                     kw.get("backup", "host"), kw.get("admission", "continuous"))
        serving_sizes(cfg, **{k: kw[k] for k in ("seqs_per_rank", "max_model_len", "prefill_chunk", "prefill_rows")
                              if k in kw})
        kw.setdefault("source", {"config": raw, "seed": seed})
        return cls(cfg, random_params(cfg, DTYPES[dtype], seed), num_ranks=num_ranks,
                   redundant_experts=redundant_experts, dtype=dtype, **kw)

    def close(self):
        if self._runtime is not None:
            self._finalizer()           # runtime.close(), once
        self._closed, self._runtime = True, None
        if self.metrics is not None:
            self.metrics.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def transient_retries(self) -> int:
        """Steps run again after a timeout with every rank alive."""
        return self._loop.transient_retries

    def _check_open(self):
        if self._loop.dead is not None:
            raise EngineDead(f"the engine has stopped: {self._loop.dead}")
        if self._closed:
            raise RuntimeError("the engine is closed")

    # -- placement ----------------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        """The current placement in global rank numbering (a dead rank's slots are empty)."""
        return self._controller.placement

    @property
    def active(self) -> np.ndarray:
        """[num_ranks] int32: 1 for the ranks taking part in the current epoch."""
        return self._controller.active.copy()

    @property
    def alive(self) -> np.ndarray:
        """[num_ranks] bool: ranks not lost to a failure."""
        return self._controller.alive.copy()

    def _fit(self, p: Placement) -> Placement:
        return self._controller.fit(p, self.cfg.num_moe_layers, self.cfg.num_experts)

    def _install(self, active: np.ndarray, p: Placement):
        self._controller.apply(active, p, self._runtime)
        self._scheduler.set_live(self._runtime.live)

    def set_placement(self, p: Placement):
        """Installs any valid placement: expert weights move between slots; nothing recompiles."""
        self._check_open()
        self._install(self.active, self._fit(validate(p, self.alive)))

    def set_active(self, active: Sequence[int]):
        """Sets the active-ranks mask (int 0/1 per rank): inactive ranks receive no tokens."""
        self._check_open()
        active = np.asarray(active, np.int32)
        if active.shape != (self.num_ranks,) or not np.isin(active, (0, 1)).all():
            raise ValueError(f"active must be {self.num_ranks} values of 0 or 1, got {active.tolist()}")
        if (active.astype(bool) & ~self.alive).any():
            raise ValueError(f"ranks {np.nonzero(active.astype(bool) & ~self.alive)[0].tolist()} are dead")
        self._install(active, self.placement)

    @property
    def admission(self) -> str:
        """The scheduler's admission policy: "continuous" or "static" (only when every slot is free)."""
        return self._scheduler.admission

    @admission.setter
    def admission(self, policy: str):
        if policy not in ADMISSION:
            raise ValueError(f"admission must be one of {ADMISSION}, got {policy!r}")
        self._scheduler.admission = policy

    def rebalance(self, policy: str | None = None) -> Placement:
        """Re-places experts from the measured loads over the alive ranks, close to the current placement."""
        self._check_open()
        p = rebalance(self.expert_loads().astype(np.float64) + 1.0, self.num_ranks, self.slots_per_rank,
                      policy=policy or self._controller.policy, alive=self.alive, previous=self.placement,
                      max_replicas=self.max_replicas)
        self.set_placement(p)
        return p

    def expert_loads(self) -> np.ndarray:
        """[Lm, E] tokens routed to each logical expert over the last steps (the load window)."""
        return self._loop.expert_loads(self.cfg.num_moe_layers, self.cfg.num_experts)

    # -- failures -----------------------------------------------------------------------------------
    def fail_rank(self, rank: int, how: str = "kill", at_step: int | None = None, delay_s: float = 1.0):
        """Injects the failure of `rank`: now, or when step `at_step` of the next generate() starts (a
        step: one decode and/or one prefill chunk). how: "kill", "hang", "slow", "drop" (the last three
        mooncake only). Safe from any thread while generate runs."""
        self._check_open()
        hows = SPMD_FAILURES if self.mode == Mode.SPMD else tuple(FailureKind)
        try:
            how = FailureKind.parse(how, "how", hows)
        except ValueError as e:
            raise ValueError(f"mode={self.mode.value!r}: {e}; hang, slow and drop need mode='mooncake'") from None
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.num_ranks \
                or not self.alive[rank]:
            raise ValueError(f"rank {rank!r} is not a live rank (alive: {np.nonzero(self.alive)[0].tolist()})")
        if at_step is not None:
            positive("at_step", at_step, 0)
        if self.mode == Mode.MOONCAKE and at_step is None and how in (FailureKind.KILL, FailureKind.HANG):
            self._runtime.inject(rank, how)          # a signal: safe from any thread, fires now
            return
        self._loop.inject_at(rank, how, at_step, delay_s)

    def restart_rank(self, rank: int):
        """Brings a failed rank back (mooncake mode): a fresh worker joins at a step boundary, gets
        slots by a rebalance close to the current placement, and takes load from the next step on."""
        self._check_open()
        if self.mode != Mode.MOONCAKE:
            raise ValueError("restart_rank needs mode='mooncake' (a lost device does not come back)")
        self._controller.rejoin(rank, self._runtime, self.expert_loads())
        self._scheduler.set_live(self._runtime.live)

    def wait_fallbacks(self) -> int:
        """spmd: waits for the background precompilation; how many survivor sets are ready."""
        return self._runtime.wait_fallbacks() if self.mode == Mode.SPMD else 0

    def stats(self) -> dict:
        """The epoch, active ranks, and one record per recovery."""
        return {"mode": self.mode.value, "epoch": self._controller.epoch.number,
                "active_ranks": np.nonzero(self.active)[0].tolist(),
                "alive_ranks": np.nonzero(self.alive)[0].tolist(), "transient_retries": self.transient_retries,
                "recoveries": [r.as_dict() for r in self._controller.records],
                # mooncake: what fencing dropped (exchange signals, steps, replies of another epoch)
                **({"stale": self._runtime.stale_counts()} if self.mode == Mode.MOONCAKE else {})}

    # -- compute ------------------------------------------------------------------------------------
    def score(self, token_ids) -> np.ndarray:
        """Full-sequence forward. token_ids [B, S] ints -> float32 logits [B, S, V] (mode spmd)."""
        self._check_open()
        if self.mode != Mode.SPMD:
            raise ValueError("score() runs in mode='spmd'; mode='mooncake' serves generate()")
        ids = check_token_array(token_ids, self.cfg.vocab_size)
        n = len(self._runtime.live)
        batch = -(-max(8, 1 << (ids.shape[0] - 1).bit_length()) // n) * n
        return self._runtime.score(ids, batch, max(8, 1 << (ids.shape[1] - 1).bit_length()))

    def generate(self, prompts, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0, stop_token_ids=None,
                 progress: bool = False) -> list[GenerationResult]:
        """Generates for each prompt (token-id lists, or strings with a tokenizer). Every setting is one
        value for all prompts or a list with one per prompt; stop_token_ids default to the model's eos
        ids ([] disables stopping). Results keep the prompts' order. A rank failure during the call is
        recovered from; the results are the same as without it."""
        self._check_open()
        reqs = make_requests(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, stop_token_ids=stop_token_ids, default_stops=list(self.cfg.eos_token_id),
                             vocab_size=self.cfg.vocab_size, max_model_len=self.max_model_len,
                             tokenizer=self.tokenizer)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(r.params.max_new_tokens for r in reqs), desc="generate", unit="tok")
        self._busy = True
        try:
            self._loop.run(reqs, bar)
        finally:
            self._scheduler.clear()
            self._busy = False
            if self._runtime is not None:
                self._runtime.idle(lambda: self._busy)
            if bar is not None:
                bar.close()
        self.last_requests = reqs
        results = [GenerationResult(r.out, r.prompt, r.finish_reason) for r in reqs]
        if self.tokenizer is not None:
            for r in results:
                r.text = self.tokenizer.decode(r.token_ids)
        return results
