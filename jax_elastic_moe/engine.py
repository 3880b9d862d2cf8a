"""The Python API: Engine.from_pretrained / from_config, score, generate, placement."""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, ModelConfig, load_config_file
from .model.loader import load_checkpoint, random_params
from .placement import Placement, PlacementError, rebalance, validate
from .runtime.spmd import SpmdRunner

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


class Engine:
    """Batch inference of a MoE model with expert parallelism over `num_ranks` ranks.

    Physical expert slots = logical experts + redundant_experts, spread evenly over the ranks."""

    def __init__(self, cfg: ModelConfig, params: dict, *, num_ranks: int = 1, redundant_experts: int = 0,
                 dtype: str = "float32", tokenizer=None, placement_policy: str = "round_robin",
                 max_batch_size: int = 64, load_window: int = 64):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
        num_slots = cfg.num_experts + redundant_experts
        if num_slots % num_ranks:
            raise ValueError(
                f"{cfg.num_experts} experts + redundant_experts={redundant_experts} = {num_slots} slots do not "
                f"divide evenly over num_ranks={num_ranks}")
        self.cfg, self.dtype, self.tokenizer = cfg, dtype, tokenizer
        self.num_ranks, self.redundant_experts = num_ranks, redundant_experts
        self.slots_per_rank = num_slots // num_ranks
        self.max_replicas = redundant_experts + 1
        self.max_batch_size = max_batch_size
        self.placement_policy = placement_policy
        self._active = np.ones(num_ranks, np.int32)
        self._loads = collections.deque(maxlen=load_window)
        self._closed = False
        placement = self._fit(rebalance(np.ones((cfg.num_moe_layers, cfg.num_experts)), num_ranks,
                                        self.slots_per_rank, policy=placement_policy))
        self._runner = SpmdRunner(cfg, params, placement, local_devices(num_ranks), DTYPES[dtype])
        self._placement = placement
        self._log2phy = self._runner.put_replicated(placement.log2phy)
        self._active_dev = self._runner.put_replicated(self._active)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, num_ranks: int = 1, redundant_experts: int = 0,
                        dtype: str = "float32", **kw) -> "Engine":
        """Loads a Hugging Face checkpoint directory (config.json + *.safetensors [+ tokenizer.json])."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        cfg, params = load_checkpoint(path, DTYPES[dtype])
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
        cfg = load_config_file(resolve_preset(preset))
        return cls(cfg, random_params(cfg, DTYPES[dtype], seed), num_ranks=num_ranks,
                   redundant_experts=redundant_experts, dtype=dtype, **kw)

    def close(self):
        self._closed = True
        self._runner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("the engine is closed")

    # -- placement ----------------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def active(self) -> np.ndarray:
        """[num_ranks] int32: 1 for the ranks taking part in the current epoch."""
        return self._active.copy()

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
        p = self._fit(validate(p))
        self._check_live(p, self._active)
        self._runner.move_experts(self._placement, p)
        self._placement = p
        self._log2phy = self._runner.put_replicated(p.log2phy)

    def set_active(self, active: Sequence[int]):
        """Sets the active-ranks mask (int 0/1 per rank): inactive ranks receive no tokens."""
        self._check_open()
        active = np.asarray(active, np.int32)
        if active.shape != (self.num_ranks,) or not np.isin(active, (0, 1)).all():
            raise ValueError(f"active must be {self.num_ranks} values of 0 or 1, got {active.tolist()}")
        self._check_live(self._placement, active)
        self._active = active
        self._active_dev = self._runner.put_replicated(active)

    def expert_loads(self) -> np.ndarray:
        """[Lm, E] tokens routed to each logical expert over the last steps (the load window)."""
        if not self._loads:
            return np.zeros((self.cfg.num_moe_layers, self.cfg.num_experts), np.int64)
        return np.sum(self._loads, axis=0)

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

    def _batch_pad(self, b: int) -> int:
        n = self.num_ranks
        return -(-_bucket(b, 1) // n) * n

    # -- compute ------------------------------------------------------------------------------------
    def score(self, token_ids) -> np.ndarray:
        """Full-sequence forward. token_ids [B, S] ints -> float32 logits [B, S, V]."""
        self._check_open()
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
        fn = self._runner.score_fn(bp, sp)
        logits, counts = fn(self._runner.params, self._runner.put_batch(padded), self._log2phy, self._active_dev)
        return np.asarray(logits)[:b, :s]

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                 progress: bool = False) -> list[GenerationResult]:
        """Generates up to max_new_tokens for each prompt (token id lists, or strings with a tokenizer).
        stop_token_ids: default the model's eos ids; [] disables stopping."""
        self._check_open()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            prompts = list(prompts) if not isinstance(prompts, (str, bytes)) else [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        encoded = [self._encode(p) for p in prompts]
        stops = set(self.cfg.eos_token_id if stop_token_ids is None else stop_token_ids)
        results = []
        for start in range(0, len(encoded), self.max_batch_size):
            chunk = encoded[start:start + self.max_batch_size]
            results += self._generate_batch(chunk, max_new_tokens, temperature, top_p, seed + start, stops,
                                            progress)
        if self.tokenizer is not None:
            for r in results:
                r.text = self.tokenizer.decode(r.token_ids)
        return results

    def _generate_batch(self, prompts, max_new, temperature, top_p, seed, stops, progress):
        b = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        bp, sp = self._batch_pad(b), _bucket(int(lengths.max()))
        cache_len = _bucket(sp + max_new)
        tokens = np.zeros((bp, sp), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lens = np.ones(bp, np.int32)
        lens[:b] = lengths
        run = self._runner
        key = jax.random.key(seed)
        temp, tp = jnp.float32(temperature), jnp.float32(top_p)
        prefill = run.prefill_fn(bp, sp, cache_len)
        nxt, cache, counts = prefill(run.params, run.put_batch(tokens), run.put_batch(lens), self._log2phy,
                                     self._active_dev, jax.random.fold_in(key, 0), temp, tp)
        out = [[] for _ in range(b)]
        done = np.zeros(bp, bool)
        done[b:] = True
        positions = lens.copy()
        decode = run.decode_fn(bp, cache_len)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=max_new, desc="decode", unit="step")
        for step in range(max_new):
            toks = np.asarray(nxt)
            self._loads.append(np.asarray(counts))
            for i in range(b):
                if not done[i]:
                    out[i].append(int(toks[i]))
                    if toks[i] in stops or len(out[i]) >= max_new:
                        done[i] = True
            if bar is not None:
                bar.update(1)
            if done.all():
                break
            nxt, cache, counts = decode(run.params, cache, run.put_batch(toks), run.put_batch(positions),
                                        run.put_batch(~done), self._log2phy, self._active_dev,
                                        jax.random.fold_in(key, step + 1), temp, tp)
            positions = positions + 1
        if bar is not None:
            bar.close()
        return [GenerationResult(token_ids=o, prompt_token_ids=list(p),
                                 finish_reason="stop" if o and o[-1] in stops else "length")
                for o, p in zip(out, prompts)]
