"""Run Transport ranks in child processes on loopback: the harness of tests and benchmarks.

`LoopbackCluster` spawns one process per rank ("spawn" start method), each owning a `Transport` on
127.0.0.1 (a FaultInjectingTransport: the "fault" command drops or delays its sends), and drives them
over pipes with commands that are bounded in time on both sides. Every
child dies with its parent (PR_SET_PDEATHSIG), exits after `lifetime_s`, and `close()` kills every
child it started by pid (SIGCONT first, so a stopped child can die too).

Payloads are deterministic (`make_payload`), so a receiver's bytes can be checked by anyone: rows
float32 [n, row_bytes // 4] from a generator seeded by (src, dest) with column 0 set to the seq, and
meta int32 [src, dest, seq, n].
"""
from __future__ import annotations

import ctypes
import importlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
import zlib
from typing import Iterable

import numpy as np

from ..runtime.processes import proc_state
from ..runtime.transport import FaultInjectingTransport, PeerAddress, PeerFailure, Transport

__all__ = ["LoopbackCluster", "RankError", "make_payload", "payload_digest"]

_BASES: dict[tuple[int, int, int, int], np.ndarray] = {}


def make_payload(src: int, dest: int, seq: int, rows: int, row_bytes: int) -> list[np.ndarray]:
    """The payload `src` sends `dest` for `seq`: [rows float32 [rows, row_bytes // 4], meta int32 [4]]."""
    key = (src, dest, rows, row_bytes)
    base = _BASES.get(key)
    if base is None:
        rng = np.random.default_rng([src, dest, rows, row_bytes])
        base = _BASES[key] = rng.standard_normal((rows, row_bytes // 4), dtype=np.float32)
    data = base.copy()
    if rows:
        data[:, 0] = seq
    return [data, np.array([src, dest, seq, rows], dtype=np.int32)]


def payload_digest(arrays: Iterable[np.ndarray]) -> list:
    """(dtype, shape, crc32) per array: compact, exact evidence of what arrived."""
    return [(str(a.dtype), list(a.shape), zlib.crc32(np.ascontiguousarray(a).view(np.uint8).data))
            for a in arrays]


class RankError(RuntimeError):
    """A rank process failed to run a command (not a peer failure)."""


# ---------------------------------------------------------------------------------- child side


def die_with_parent():
    """Linux: this process gets SIGKILL when its parent dies (children never outlive their starter)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: lifetime_s still bounds the child
        pass


def _exchange(t: Transport, seq: int, rows: int, dests, timeout: float, digests: bool):
    outgoing = {d: make_payload(t.rank, d, seq, rows, t.layout.row_bytes) for d in dests}
    start = time.monotonic()
    result = t.exchange(outgoing, seq, timeout=timeout)
    end = time.monotonic()
    bad = {}
    for src, arrays in result.payloads.items():
        want = make_payload(src, t.rank, seq, rows, t.layout.row_bytes)
        if len(arrays) != 2 or not all(np.array_equal(a, b) for a, b in zip(arrays, want)):
            bad[src] = f"payload from rank {src} differs from make_payload({src}, {t.rank}, {seq})"
    out = {"failed": dict(result.failed), "silent": sorted(result.silent), "bad": bad,
           "elapsed": end - start, "t_end": end, "received": sorted(result.payloads)}
    if digests:
        out["digests"] = {src: payload_digest(a) for src, a in result.payloads.items()}
    return out


def _run(t: Transport, first_seq: int, steps: int, rows: int, dests, timeout: float):
    """Back-to-back exchanges until one fails or `steps` are done."""
    latencies = []
    for seq in range(first_seq, first_seq + steps):
        out = _exchange(t, seq, rows, dests, timeout, digests=False)
        if out["failed"] or out["bad"]:
            return {"steps": len(latencies), "latencies": latencies, "failed": out["failed"],
                    "silent": out["silent"], "bad": out["bad"], "seq": seq, "t_detect": out["t_end"]}
        latencies.append(out["elapsed"])
    return {"steps": len(latencies), "latencies": latencies, "failed": {}, "silent": [], "bad": {},
            "seq": None, "t_detect": None}


def _fill_weights(t: Transport, seed: int):
    t.weights[:] = np.random.default_rng(seed).integers(0, 256, t.weights.nbytes, dtype=np.uint8)
    return zlib.crc32(t.weights.data)


def _read(t: Transport, peer: int, offset: int, nbytes: int, timeout: float):
    into = t.weights[:nbytes]
    t.read(peer, offset, nbytes, into, timeout=timeout)
    return zlib.crc32(into.data)


def _invoke(t: Transport, target: str, **kwargs):
    """Runs `module:function(t, **kwargs)` in the rank process (helpers of other modules' tests and
    benchmarks, e.g. testing/exchange_check.py); its return value is the reply."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(t, **kwargs)


_COMMANDS = {
    "set_peers": lambda t, table, timeout: t.set_peers(table, timeout=timeout),
    "exchange": lambda t, seq, rows, dests, timeout, digests=True: _exchange(t, seq, rows, dests, timeout, digests),
    "run": _run,
    "fault": lambda t, **kw: t.set_fault(**kw),
    "fill_weights": _fill_weights,
    "read": _read,
    "state": lambda t: {"orphans": t.reclaim(),
                        "peers": {r: t.peer_state(r) for r in range(t.num_ranks) if r != t.rank}},
    "close": lambda t: t.close(),
    "invoke": _invoke,
}


def _rank_main(conn, rank: int, num_ranks: int, transport_kwargs: dict, lifetime_s: float):
    die_with_parent()
    end = time.monotonic() + lifetime_s
    try:
        transport = FaultInjectingTransport(rank, num_ranks, **transport_kwargs)
    except Exception as e:
        conn.send(("error", f"rank {rank} could not start its Transport: {e!r}"))
        return
    conn.send(("ok", transport.address.to_dict()))
    while time.monotonic() < end:
        try:
            if not conn.poll(min(1.0, max(0.0, end - time.monotonic()))):
                continue
            cmd, kwargs = conn.recv()
        except (EOFError, OSError):  # parent gone
            break
        try:
            reply = ("ok", _COMMANDS[cmd](transport, **kwargs))
        except PeerFailure as e:
            reply = ("peer_failure", (list(e.ranks), e.reason))
        except Exception:
            reply = ("error", f"rank {rank} failed to run {cmd!r}:\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
        if cmd == "close":
            break
    transport.close(timeout=0.5)


# ---------------------------------------------------------------------------------- parent side


def _wait_stopped(pid: int, timeout: float):
    """Wait until every thread of `pid` is in state T (stopped); Linux /proc, else a short sleep."""
    task_dir = f"/proc/{pid}/task"
    if not os.path.isdir(task_dir):
        time.sleep(0.1)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [st for tid in os.listdir(task_dir)        # None: the thread exited meanwhile
                  if (st := proc_state(f"{task_dir}/{tid}/stat")) is not None]
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop within {timeout} s")


class LoopbackCluster:
    """`num_ranks` Transport processes on loopback.

    Args:
      num_ranks: ranks of the job.
      ranks: the ranks to run as child processes (default all; leave one out to own it in-process).
      lifetime_s: hard bound on every child's life.
      env: extra environment for the children (Mooncake's MC_* knobs; MC_LOG_LEVEL defaults to ERROR).
      **transport_kwargs: passed to every Transport (max_rows, row_bytes, meta_bytes, ...).
    """

    def __init__(self, num_ranks: int, *, ranks: Iterable[int] | None = None, lifetime_s: float = 120.0,
                 env: dict | None = None, start_timeout: float = 60.0, **transport_kwargs):
        self.num_ranks = num_ranks
        self.ranks = list(range(num_ranks) if ranks is None else ranks)
        self.lifetime_s = lifetime_s
        self.start_timeout = start_timeout
        self.transport_kwargs = {"max_rows": 64, "row_bytes": 4096, "meta_bytes": 256, **transport_kwargs}
        self.env = {"MC_LOG_LEVEL": "ERROR", **(env or {})}
        self._ctx = mp.get_context("spawn")
        self.procs: dict[int, mp.Process] = {}
        self.conns: dict = {}
        self.addresses: dict[int, PeerAddress] = {}
        self.pids: list[int] = []  # every pid ever started, for cleanup

    @property
    def row_bytes(self) -> int:
        return self.transport_kwargs["row_bytes"]

    def __enter__(self):
        try:
            self.start(self.ranks)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, ranks: Iterable[int] | None = None):
        """Start (or restart) processes for `ranks` (default all) and wait for their addresses."""
        ranks = list(range(self.num_ranks) if ranks is None else ranks)
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # spawn children inherit the parent's environment at start()
        try:
            for rank in ranks:
                parent, child = self._ctx.Pipe()
                proc = self._ctx.Process(target=_rank_main, name=f"loopback-rank{rank}", daemon=True,
                                         args=(child, rank, self.num_ranks, self.transport_kwargs, self.lifetime_s))
                proc.start()
                child.close()
                self.pids.append(proc.pid)
                self.procs[rank], self.conns[rank] = proc, parent
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        deadline = time.monotonic() + self.start_timeout
        for rank in ranks:
            self.addresses[rank] = PeerAddress.from_dict(self._collect(rank, deadline))

    def table(self, ranks: Iterable[int] | None = None) -> dict[int, dict]:
        ranks = sorted(self.addresses) if ranks is None else ranks
        return {r: self.addresses[r].to_dict() for r in ranks}

    def submit(self, rank: int, cmd: str, **kwargs):
        self.conns[rank].send((cmd, kwargs))

    def _collect(self, rank: int, deadline: float):
        conn = self.conns[rank]
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"rank {rank} (pid {self.procs[rank].pid}) did not answer in time")
        try:
            kind, value = conn.recv()
        except EOFError as e:
            raise RankError(f"rank {rank} (pid {self.procs[rank].pid}) exited") from e
        if kind == "peer_failure":
            return PeerFailure(*value)
        if kind == "error":
            raise RankError(value)
        return value

    def collect(self, rank: int, wait: float):
        """The reply to the last submitted command, waiting at most `wait` seconds; a PeerFailure
        is returned, not raised."""
        return self._collect(rank, time.monotonic() + wait)

    def call(self, rank: int, cmd: str, wait: float = 10.0, **kwargs):
        self.submit(rank, cmd, **kwargs)
        return self.collect(rank, wait)

    def call_all(self, ranks: Iterable[int], cmd: str, wait: float = 10.0, **kwargs) -> dict:
        """Run `cmd` on every rank of `ranks` at once; rank -> reply (PeerFailure returned)."""
        ranks = list(ranks)
        for rank in ranks:
            self.submit(rank, cmd, **kwargs)
        deadline = time.monotonic() + wait
        return {rank: self._collect(rank, deadline) for rank in ranks}

    def install_peers(self, ranks: Iterable[int] | None = None, timeout: float = 5.0) -> dict:
        """Give every rank in `ranks` (default all) the table of `ranks`; rank -> None or PeerFailure."""
        ranks = sorted(self.addresses) if ranks is None else list(ranks)
        table = self.table(ranks)
        return self.call_all(ranks, "set_peers", wait=timeout + 5.0, table=table, timeout=timeout)

    def exchange(self, ranks: Iterable[int], seq: int, rows: int, *, dests: Iterable[int] | None = None,
                 timeout: float = 0.5, digests: bool = True, wait: float = 10.0) -> dict:
        """All-to-all among `ranks` (each sends to `dests`, default `ranks`, itself included)."""
        ranks = list(ranks)
        dests = ranks if dests is None else list(dests)
        return self.call_all(ranks, "exchange", wait=wait, seq=seq, rows=rows, dests=dests,
                             timeout=timeout, digests=digests)

    def signal(self, rank: int, sig: int) -> float:
        """Send `sig` to `rank`'s process; returns time.monotonic() just before. For SIGSTOP, returns
        once every thread of the process is stopped (a thread may run a moment after the signal)."""
        pid = self.procs[rank].pid
        now = time.monotonic()
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            _wait_stopped(pid, timeout=5.0)
        return now

    def kill(self, rank: int) -> float:
        now = self.signal(rank, signal.SIGKILL)
        self.procs[rank].join(5.0)
        return now

    def restart(self, rank: int):
        """Kill `rank` if alive and start a fresh process for it (a new address)."""
        proc = self.procs.get(rank)
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)
            self.kill(rank)
        self.conns[rank].close()
        self.start([rank])

    def close(self):
        """Kill every process this cluster started, by pid, and reap them."""
        for rank, conn in self.conns.items():
            try:
                conn.close()
            except OSError:
                pass
        for proc in self.procs.values():
            if proc.is_alive():
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(proc.pid, sig)
                    except ProcessLookupError:
                        break
            proc.join(5.0)
        self.procs.clear()
        self.conns.clear()


def _main(argv: list[str]) -> int:  # pragma: no cover - manual smoke run
    with LoopbackCluster(int(argv[1]) if len(argv) > 1 else 3) as cluster:
        print(cluster.install_peers())
        print(cluster.exchange(range(cluster.num_ranks), 1, 8, digests=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv))
