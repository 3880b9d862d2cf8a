"""The engine's settings, checked before any weight is built, and what generate() returns."""
from __future__ import annotations

import dataclasses

import numpy as np

from .config import DTYPES, check_mooncake_support
from .kinds import Mode

MODES = tuple(Mode)
ADMISSION = ("continuous", "static")


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]            # generated tokens (the stop token included when one ended it)
    prompt_token_ids: list[int]
    finish_reason: str              # "stop" | "length"
    text: str | None = None         # decoded generated tokens, when the model has a tokenizer


def positive(name: str, v, minimum: int = 1) -> int:
    """An int >= minimum (not a bool, not a float), or a ValueError naming the setting."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def check_engine(cfg, num_ranks, redundant_experts, dtype, mode, source, backup, admission):
    """Engine settings that do not need the weights."""
    positive("num_ranks", num_ranks)
    positive("redundant_experts", redundant_experts, 0)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    mode = Mode.parse(mode, "mode")
    if mode == Mode.MOONCAKE and source is None:
        raise ValueError("mode='mooncake' needs the model's source: use Engine.from_config / from_pretrained")
    if mode == Mode.MOONCAKE:
        check_mooncake_support(cfg)
    if backup not in ("host", None):
        raise ValueError(f"backup must be 'host' or None, got {backup!r}")
    if admission not in ADMISSION:
        raise ValueError(f"admission must be one of {ADMISSION}, got {admission!r}")
    num_slots = cfg.num_experts + redundant_experts
    if num_slots % num_ranks:
        raise ValueError(f"{cfg.num_experts} experts + redundant_experts={redundant_experts} = {num_slots} slots "
                         f"do not divide evenly over num_ranks={num_ranks}")


def serving_sizes(cfg, seqs_per_rank=8, max_model_len=None, prefill_chunk=256, prefill_rows=None):
    """(seqs_per_rank, max_model_len, prefill_chunk, prefill_rows) checked, defaults filled in:
    max_model_len min(model limit, 1024), the chunk at most max_model_len, prefill_rows half the slots."""
    seqs = positive("seqs_per_rank", seqs_per_rank)
    length = positive("max_model_len", min(cfg.max_position_embeddings, 1024) if max_model_len is None
                      else max_model_len, 2)
    if length > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={length} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    chunk = min(positive("prefill_chunk", prefill_chunk), length)
    rows = positive("prefill_rows", max(1, seqs // 2) if prefill_rows is None else prefill_rows)
    return seqs, length, chunk, rows


def check_token_array(token_ids, vocab_size: int) -> np.ndarray:
    """score()'s input: a non-empty [batch, seq] array of ints inside the vocabulary."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"token_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


