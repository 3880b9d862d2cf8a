"""The scheduler: every request's state, and continuous batching over fixed slots.

Each live rank has `seqs_per_rank` KV-cache slots (data-parallel attention: a request's cache lives
on one rank). A step of the engine is one program of a fixed shape (runtime/step.py):

  decode   one token for every running request (every slot of every live rank; idle slots padded)
  prefill  a chunk of up to `chunk` context tokens for up to `prefill_rows` requests per rank, the
           chunk size and the row count bucketed (a few compiled shapes), and in the same step one
           token for every running request: running requests keep decoding while a long prompt is
           prefilled, and a newly admitted request costs its chunks, not extra steps

Requests are admitted into free slots as others finish ("continuous"), or only when every slot is
free ("static": the old batch-at-a-time behaviour, a policy here, not a second code path). A failure
sends back to the queue only the requests whose slots were on the dead ranks; they are prefilled
again from prompt + tokens so far through the same admission path, and the others keep their cache.
Token i of a request is sampled from (its seed, fold_in(request id, i)): the same token whatever the
batch, slot, rank or failure."""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from .runtime.step import ROW_INPUTS, StepShape, padding_value
from .settings import ADMISSION


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: frozenset = frozenset()


@dataclasses.dataclass
class Request:
    id: int                             # its index in the generate call; numbers its sampling stream
    prompt: list[int]
    params: SamplingParams
    out: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None    # "stop" | "length" once done
    rank: int | None = None             # the global rank holding its cache slot
    slot: int | None = None
    cached: int = 0                     # context tokens written to its cache slot
    target: int = 0                     # context tokens to prefill (set at admission)
    arrived: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)
    requeued_at: float | None = None    # when a failure last sent it back to the queue
    requeue_delays: list[float] = dataclasses.field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def sample_id(self) -> int:
        return (self.id * 1_000_003 + len(self.out)) % (2 ** 31)


@dataclasses.dataclass
class Batch:
    """The numpy inputs of one step over the live ranks (rank-major: rows of live[i] first)."""
    shape: StepShape
    rows: dict                          # step.input_rows name -> [live * its rows (, chunk)] array
    requests: list                      # (row of the step's next tokens, Request[, prefill tokens])


def chunk_buckets(max_chunk: int, smallest: int = 32) -> tuple[int, ...]:
    """Prefill chunk sizes compiled: powers of 2 times `smallest` below max_chunk, then max_chunk (a
    prompt pads to at most twice its length; each size is one program per row count)."""
    sizes, c = [], smallest
    while c < max_chunk:
        sizes.append(c)
        c *= 2
    return tuple(sizes) + (max_chunk,)


class Scheduler:
    def __init__(self, live: list[int], seqs_per_rank: int, prefill_rows: int, max_chunk: int,
                 cache_len: int, admission: str = "continuous"):
        if admission not in ADMISSION:
            raise ValueError(f"admission must be one of {ADMISSION}, got {admission!r}")
        self.seqs_per_rank, self.prefill_rows, self.cache_len = seqs_per_rank, prefill_rows, cache_len
        self.buckets = chunk_buckets(max_chunk)
        self.admission = admission
        self.live: list[int] = list(live)
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: dict[tuple[int, int], Request] = {}       # (rank, slot) -> request
        self.requeued = 0

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def row_buckets(self) -> tuple[int, ...]:
        """Prefill rows per rank compiled: 1 (a request admitted alone) and prefill_rows."""
        return tuple(sorted({1, self.prefill_rows}))

    def shapes(self) -> list[StepShape]:
        """Every step shape this scheduler can ask for (the warm-up compiles them all)."""
        s, l = self.seqs_per_rank, self.cache_len
        first = [StepShape("prefill", p, c, s, l, c) for p in self.row_buckets for c in self.buckets]
        later = [StepShape("prefill", p, self.buckets[-1], s, l) for p in self.row_buckets]
        return [StepShape("decode", s, 1, s, l)] + first + (later if self.buckets[-1] < l else [])

    # -- requests -------------------------------------------------------------------------------
    def add(self, requests: list[Request]):
        now = time.perf_counter()
        for r in requests:
            r.arrived = now
            self.waiting.append(r)

    def clear(self):
        """Forgets every request (a generate() call ended, normally or not)."""
        self.waiting.clear()
        self.slots.clear()

    def unfinished(self) -> bool:
        return bool(self.waiting or self.slots)

    def set_live(self, live: list[int]) -> list[Request]:
        """The ranks of the new epoch; requests whose slots were on other ranks go back to the front
        of the queue (oldest first) with their tokens so far. Returns them."""
        self.live = list(live)
        return self._requeue([k for k in self.slots if k[0] not in self.live])

    def evict_all(self) -> list[Request]:
        """Every request back to the queue (the caches were lost)."""
        return self._requeue(list(self.slots))

    def _requeue(self, keys: list) -> list[Request]:
        gone = sorted((self.slots.pop(k) for k in keys), key=lambda r: r.id)
        now = time.perf_counter()
        for r in reversed(gone):
            r.rank = r.slot = None
            r.cached = 0
            r.requeued_at = now
            self.waiting.appendleft(r)
        self.requeued += len(gone)
        return gone

    def _admit(self):
        if self.admission == "static" and self.slots:
            return
        free = {rank: [j for j in range(self.seqs_per_rank) if (rank, j) not in self.slots] for rank in self.live}
        while self.waiting:
            rank = max(self.live, key=lambda k: (len(free[k]), -self.live.index(k)), default=None)
            if rank is None or not free[rank]:
                return
            r = self.waiting.popleft()
            r.rank, r.slot, r.cached, r.target = rank, free[rank].pop(0), 0, len(r.context)
            self.slots[(rank, r.slot)] = r

    # -- steps ----------------------------------------------------------------------------------
    def _empty_rows(self, prefix: str, rows: int, chunk: int, slot_default) -> dict:
        n = len(self.live) * rows
        return {prefix + name: np.full((n, chunk) if chunked else (n,),
                                       padding_value(name, self.cache_len, slot_default), np.dtype(dtype))
                for name, (dtype, chunked) in ROW_INPUTS.items()}

    @staticmethod
    def _sampling(rows: dict, prefix: str, i: int, r: Request):
        rows[prefix + "seeds"][i] = r.params.seed
        rows[prefix + "sample_ids"][i] = r.sample_id
        rows[prefix + "temperature"][i] = r.params.temperature
        rows[prefix + "top_p"][i] = r.params.top_p

    def next_batch(self) -> Batch | None:
        """The next step, after admitting what fits: while some request is prefilling, a prefill step
        (the next chunk of up to prefill_rows of them per rank, and a token for every running
        request); else a decode step (a token for every running request); None when nothing runs."""
        self._admit()
        s = self.seqs_per_rank
        running = [(k, r) for k, r in self.slots.items() if r.cached >= r.target]
        plan = self._prefill_plan()
        if plan is None:
            if not running:
                return None
            rows, taken = self._decode_rows("", running, s, 0)
            return Batch(StepShape("decode", s, 1, s, self.cache_len), rows, taken)
        per_rank, p, chunk, attend = plan
        rows, taken = self._decode_rows("decode_", running, p + s, p)
        rows.update(self._empty_rows("", p, chunk, s))
        for rank, rs in per_rank.items():
            li = self.live.index(rank)
            for k, r in enumerate(rs):
                i = li * p + k
                n = min(chunk, r.target - r.cached)
                rows["tokens"][i, :n] = r.context[r.cached:r.cached + n]
                rows["positions"][i, :n] = np.arange(r.cached, r.cached + n)
                rows["valid"][i, :n] = True
                rows["slot"][i] = r.slot
                rows["last"][i] = n - 1
                self._sampling(rows, "", i, r)
                taken.append((li * (p + s) + k, r, n))
        return Batch(StepShape("prefill", p, chunk, s, self.cache_len, attend), rows, taken)

    def _decode_rows(self, prefix: str, running: list, width: int, offset: int) -> tuple[dict, list]:
        """The decode group: one row per cache slot of every live rank, the running requests' last
        tokens in theirs. A slot's next token is row live index * width + offset + slot of the step."""
        s = self.seqs_per_rank
        rows = self._empty_rows(prefix, s, 1, 0)
        rows[prefix + "slot"][:] = np.tile(np.arange(s, dtype=np.int32), len(self.live))
        taken = []
        for (rank, j), r in running:
            li = self.live.index(rank)
            i = li * s + j
            rows[prefix + "tokens"][i, 0] = r.out[-1]
            rows[prefix + "positions"][i, 0] = len(r.context) - 1
            rows[prefix + "valid"][i, 0] = True
            self._sampling(rows, prefix, i, r)
            taken.append((li * width + offset + j, r))
        return rows, taken

    def _prefill_plan(self):
        """(requests per rank, rows per rank, chunk, attend) of the next prefill chunk, or None."""
        waiting = sorted((r for r in self.slots.values() if r.cached < r.target), key=lambda r: r.id)
        if not waiting:
            return None
        # first chunks and later chunks go in separate steps (a first chunk attends to itself only)
        first = waiting[0].cached == 0
        per_rank: dict[int, list[Request]] = {}
        for r in waiting:
            if (r.cached == 0) == first and len(per_rank.setdefault(r.rank, [])) < self.prefill_rows:
                per_rank[r.rank].append(r)
        p = next(b for b in self.row_buckets if b >= max(len(rs) for rs in per_rank.values()))
        if first:                                   # first chunks: attend to the chunk's own positions
            need = max(r.target for rs in per_rank.values() for r in rs)
            chunk = next((c for c in self.buckets if c >= need), self.buckets[-1])
            return per_rank, p, chunk, chunk
        return per_rank, p, self.buckets[-1], 0

    def commit(self, batch: Batch, next_tokens: np.ndarray, now: float | None = None) -> int:
        """Applies a step's results (only after the step succeeded); returns the tokens made."""
        now = time.perf_counter() if now is None else now
        made = 0
        for item in batch.requests:
            i, r = item[0], item[1]
            if len(item) == 3:                      # (row, request, tokens) of a prefill chunk
                r.cached += item[2]
                if r.cached < r.target:
                    continue
            else:
                r.cached += 1
                r.target = r.cached
            tok = int(next_tokens[i])
            r.out.append(tok)
            r.token_times.append(now)
            made += 1
            if r.requeued_at is not None:
                r.requeue_delays.append(now - r.requeued_at)
                r.requeued_at = None
            if tok in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.out) >= r.params.max_new_tokens:
                r.finish_reason = "length"
            if r.done:
                del self.slots[(r.rank, r.slot)]
        return made
