"""generate()'s arguments checked and turned into requests, before any compute.

Every per-request setting takes one value for all prompts or a list with one value per prompt.
Token ids must be ints (not bool, not float) inside the vocabulary; numbers must be finite and in
range; prompt + max_new_tokens must fit max_model_len. Errors name the prompt and the setting."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from .scheduler import Request, SamplingParams

MAX_SEED = 2 ** 32


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _per_prompt(name: str, value, n: int, *, is_list=lambda v: isinstance(v, (list, tuple, np.ndarray))) -> list:
    """One value for all n prompts, or a list of n values."""
    if is_list(value):
        value = list(value)
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts: give one value, or one per prompt")
        return value
    return [value] * n


def _check_int(name: str, v, lo: int, hi: int | None = None, where: str = "") -> int:
    if not _is_int(v):
        raise TypeError(f"{name}{where} must be an int, got {v!r} ({type(v).__name__})")
    v = int(v)
    if v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name}{where} must be {rng}, got {v}")
    return v


def _check_float(name: str, v, lo: float, hi: float, lo_open: bool, where: str = "") -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name}{where} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise ValueError(f"{name}{where} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def encode_prompt(prompt, i: int, vocab_size: int, tokenizer=None) -> list[int]:
    """Prompt i (a list of token ids, or a string with a tokenizer) -> token ids, checked."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {i} is a string, which needs a tokenizer (tokenizer.json in the checkpoint)")
        ids = tokenizer.encode(prompt).ids
    elif isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        for t in ids:
            if not _is_int(t):
                raise TypeError(f"prompt {i}: token ids must be ints, got {t!r} ({type(t).__name__}); give a "
                                f"list of token-id lists, one per prompt")
        ids = [int(t) for t in ids]
    else:
        raise TypeError(f"prompt {i} must be a list of token ids or a string, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def make_requests(prompts, *, max_new_tokens, temperature, top_p, seed, stop_token_ids, default_stops,
                  vocab_size: int, max_model_len: int, tokenizer=None) -> list[Request]:
    """The requests of one generate() call, in the prompts' order (ids 0..n-1)."""
    if prompts is None or isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise TypeError(f"prompts must be a list of prompts (token-id lists or strings), got "
                        f"{type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(_is_int(p) for p in prompts):
        raise TypeError("prompts is a flat list of ints: give a list of prompts, e.g. [[1, 2, 3]] for one prompt")
    n = len(prompts)
    ids = [encode_prompt(p, i, vocab_size, tokenizer) for i, p in enumerate(prompts)]
    news = _per_prompt("max_new_tokens", max_new_tokens, n)
    temps = _per_prompt("temperature", temperature, n)
    tops = _per_prompt("top_p", top_p, n)
    seeds = _per_prompt("seed", seed, n)
    # stop_token_ids: None (the model's eos), a list of ids for all, or a list of such lists
    per_prompt_stops = isinstance(stop_token_ids, (list, tuple)) and any(
        isinstance(s, (list, tuple, set, frozenset)) or s is None for s in stop_token_ids)
    stops = (_per_prompt("stop_token_ids", stop_token_ids, n) if per_prompt_stops
             else [stop_token_ids] * n)
    requests = []
    for i in range(n):
        where = f" of prompt {i}" if n > 1 else ""
        new = _check_int("max_new_tokens", news[i], 1, None, where)
        if len(ids[i]) + new > max_model_len:
            raise ValueError(f"prompt {i} has {len(ids[i])} tokens; with max_new_tokens={new} it needs "
                             f"{len(ids[i]) + new} positions, more than max_model_len={max_model_len}")
        s = default_stops if stops[i] is None else stops[i]
        if isinstance(s, (str, bytes)) or not isinstance(s, (list, tuple, set, frozenset, np.ndarray)):
            raise TypeError(f"stop_token_ids{where} must be a list of token ids (or None), got {s!r}")
        s = frozenset(_check_int("stop_token_ids", t, 0, vocab_size, where) for t in s)
        params = SamplingParams(
            max_new_tokens=new,
            temperature=_check_float("temperature", temps[i], 0.0, 1e4, False, where),
            top_p=_check_float("top_p", tops[i], 0.0, 1.0, True, where),
            seed=_check_int("seed", seeds[i], 0, MAX_SEED, where),
            stop_token_ids=s)
        requests.append(Request(i, ids[i], params))
    return requests
