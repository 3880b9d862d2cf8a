"""The serving loop: a generate call's requests run to the end over the scheduler, the runtime and
the controller; injected failures fire at their step; a rank failure (in a step or in a compile) is
recovered from and the step run again; a timeout with every rank alive is retried."""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from .placement import Placement
from .runtime.controller import EngineDead, RankFailure


class ServingLoop:
    """State that lives across generate calls: the step log, measured expert loads, pending injected
    failures, the recovery record awaiting its first good step."""

    def __init__(self, scheduler, runtime, controller, *, load_window: int, metrics=None,
                 exchange_timeout: float = 1.0):
        self.scheduler, self.runtime, self.controller = scheduler, runtime, controller
        self.metrics, self.exchange_timeout = metrics, exchange_timeout
        self.loads = collections.deque(maxlen=load_window)
        self.step_log: list[tuple[float, int]] = []    # (time.perf_counter() at the end, tokens made)
        self.transient_retries = 0                     # steps run again after a timeout with nobody dead
        self.dead: EngineDead | None = None
        self._failures: list[tuple] = []               # (rank, how, at_step, delay_s) not yet fired
        self._fail_lock = threading.Lock()
        self._prepared: list = []
        self._pending_record = None
        self._last_good = time.perf_counter()

    def expert_loads(self, num_layers: int, num_experts: int) -> np.ndarray:
        if not self.loads:
            return np.zeros((num_layers, num_experts), np.int64)
        return np.sum(self.loads, axis=0)

    def inject_at(self, rank: int, how: str, at_step: int | None, delay_s: float):
        with self._fail_lock:
            self._failures.append((int(rank), how, at_step, delay_s))

    def _due_failures(self, step: int):
        with self._fail_lock:
            due = [f for f in self._failures if f[2] is None or f[2] <= step]
            self._failures = [f for f in self._failures if f not in due]
        for rank, how, _, delay_s in due:
            self.runtime.inject(rank, how, delay_s)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, reqs, bar=None):
        sched = self.scheduler
        while sched.shapes() != self._prepared:         # warm-up: every shape, before any step
            try:
                self.runtime.prepare(sched.shapes())
                self._prepared = sched.shapes()
            except RankFailure as f:                    # a worker died while compiling
                if not f.ranks:
                    raise
                self.recover(f)
        sched.add(reqs)
        step, retries, background = 0, 0, True
        self._last_good = time.perf_counter()
        while sched.unfinished():
            try:
                self._due_failures(step)
                batch = sched.next_batch()              # admits into the slots the last step freed
                if batch is not None:
                    nxt, counts = getattr(self.runtime, batch.shape.kind)(batch)
                    made = sched.commit(batch, nxt)
                    self.loads.append(counts)
                    self._good_step(made)
                    if bar is not None:
                        bar.update(made)
                    if background:          # the next failures' programs: once per call, after its
                        self.runtime.after_good_step(self._decide_for)   # first good step, never after a recovery
                        background = False
                retries = 0
            except RankFailure as f:
                if f.ranks:
                    self.recover(f)
                    background = False
                    continue
                # a step timed out with every rank alive (compute skew): run it again with the peer
                # tables re-installed (a transport marks a peer failed after a timed-out write)
                retries += 1
                self.transient_retries += 1
                self.runtime.set_placement(self.controller.active, self.controller.placement)
                if retries > 5:
                    waited = getattr(self.runtime, "exchange_timeout", self.exchange_timeout)
                    scaled = (f"; {waited:g} s per exchange with more workers than cores"
                              if waited != self.exchange_timeout else "")
                    raise RuntimeError(f"steps keep timing out with every rank alive ({f.reason}); "
                                       f"raise exchange_timeout (set to {self.exchange_timeout:g} s{scaled})") from f
            step += 1

    def recover(self, failure: RankFailure):
        """The controller's new epoch over the survivors; the dead ranks' requests back to the queue."""
        if self.metrics is not None:
            self.metrics.on_recovering()
        ctl = self.controller
        try:
            while True:
                try:
                    rec = ctl.recover(failure, self.runtime, self._loads_now())
                    break
                except RankFailure as more:         # another rank died while the epoch was installed
                    merged = RankFailure(failure.ranks + more.ranks, f"{failure.reason}; then {more.reason}",
                                         failure.detected_at)
                    merged.failed_at = failure.failed_at
                    failure = merged
        except EngineDead as e:
            self.dead = e
            if self.metrics is not None:
                self.metrics.on_dead()
            raise
        gone = self.scheduler.set_live(self.runtime.live)
        if not rec.cache_kept:
            gone += self.scheduler.evict_all()
        rec.requests_requeued = len(gone)
        self._pending_record = (rec, time.perf_counter(), failure.failed_at)

    def _loads_now(self) -> np.ndarray:
        p = self.controller.placement
        return self.expert_loads(p.num_layers, p.num_logical)

    def _decide_for(self, dead: list[int]) -> Placement | None:
        """The placement the controller would choose if `dead` failed now (None: it could not serve)."""
        try:
            return self.controller.decide(dead, self._loads_now(), self.controller.placement)[1]
        except EngineDead:
            return None

    def _good_step(self, tokens: int):
        now = time.perf_counter()
        self.step_log.append((now, tokens))
        if self.metrics is not None:
            self.metrics.on_step(now - self._last_good, tokens)
        if self._pending_record is not None:
            rec, restored_at, failed_at = self._pending_record
            rec.resume_s = now - restored_at
            rec.resumed_at = now
            rec.total_s = now - min(failed_at, self._last_good)
            self._pending_record = None
            if self.metrics is not None:
                self.metrics.on_recovered(int(self.controller.active.sum()), rec.total_s)
        self._last_good = now
