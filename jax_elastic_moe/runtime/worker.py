"""A worker of the multi-process ("mooncake") runtime: one rank, one JAX device, its own process.

It holds the dense weights and its `slots_per_rank` expert slots of every MoE layer (in a Mooncake-
registered weights region that peers can read), runs attention for its share of the batch and takes
part in every MoE layer of every step: the token exchange runs inside the jitted step, through
Mooncake with deadlines: the C++ FFI op jem_exchange (runtime/exchange_ffi.py), or, when that cannot
be used here (Mooncake version, self-test), the Python transport through io_callback. Commands come
from the controller over pyzmq.

  python -m jax_elastic_moe.runtime.worker --controller tcp://HOST:PORT --rank R
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..model.loader import is_expert_path
from .expert_slots import ExpertSlots, region_bytes
from .host_exchange import HostExchange


def _empty_cache(cfg, slots_per_rank: int, dtype, shape):
    """A rank's empty KV cache for the step shape `shape` (abstract under eval_shape)."""
    import jax.numpy as jnp

    from .spmd import abstract_model
    from .step import empty_cache
    graphdef, variables = abstract_model(cfg, slots_per_rank, jnp.dtype(dtype))
    return empty_cache(graphdef, variables, shape.slots, shape.cache_len)


# failure reasons that say a peer was late, not that it is gone (weak evidence)
LATE = ("deadline", "timed out", "abandoned", "still in flight", "blocked by a handshake")


class Worker:
    def __init__(self, endpoint: str, rank: int, host: str = "127.0.0.1", self_fence_after: float | None = None):
        from .control import ControlClient
        from .protocol import register_messages
        register_messages()
        self.rank, self.host = rank, host
        self.client = ControlClient(endpoint, f"rank-{rank}")
        self.transport = None
        self.native = None          # NativeExchange, or None: the Python exchange (io_callback)
        self.heartbeat = None
        self.beacon = None
        self.python_exchange = None     # HostExchange: the Python exchange, where the op cannot be used
        self.epoch = 0                  # the installed epoch (see install())
        self.incarnation = None         # this process's, from init
        self.self_fence_after = self_fence_after
        self.stale_messages = 0         # steps refused for carrying another epoch

    # -- setup ----------------------------------------------------------------------------------
    def init(self, msg: dict):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from ..config import DTYPES, from_hf_dict
        from ..model.loader import load_checkpoint, random_params
        from .detector import HeartbeatSender
        from .transport import FaultInjectingTransport
        self.np, self.jnp, self.jax = np, jnp, jax
        self.cache_dir = msg.get("compilation_cache_dir")
        self.cfg = from_hf_dict(msg["config"])
        self.dtype = DTYPES[msg["dtype"]]
        self.num_ranks, self.spr = int(msg["num_ranks"]), int(msg["slots_per_rank"])
        self.max_rows = int(msg["max_rows"])
        self.backend = msg.get("backend", "auto")
        if msg.get("checkpoint"):
            _, params = load_checkpoint(msg["checkpoint"], self.dtype)
        elif msg.get("weights_file"):       # the controller's weights: no model to build here
            from .workers import load_weights
            params = load_weights(msg["weights_file"])
        else:
            params = random_params(self.cfg, self.dtype, int(msg["seed"]))
        self.moe_layer_ids = [i for i, m in enumerate(self.cfg.moe_layers) if m]
        itemsize = np.dtype(params[("embed",)].dtype).itemsize
        h, k = self.cfg.hidden_size, self.cfg.num_experts_per_tok
        self.transport = FaultInjectingTransport(self.rank, self.num_ranks, self.max_rows, h * itemsize,
                                                 self.max_rows * k * 8 + 256, host=self.host,
                                                 weights_bytes=region_bytes(self.cfg, self.spr, itemsize),
                                                 exchange_timeout=float(msg["exchange_timeout"]))
        self.slots = ExpertSlots(self.transport, params, self.moe_layer_ids, self.spr, self.rank,
                                 np.asarray(msg["phy2log"], np.int32))
        from .exchange_ffi import open_native_exchange
        self.native = open_native_exchange(self.transport)   # warns and returns None on a mismatch
        self.python_exchange = HostExchange(self.transport, len(self.moe_layer_ids))
        from .spmd import key_of
        self.key_of = key_of
        self.dense = {key_of(p): jax.device_put(a) for p, a in params.items() if not is_expert_path(p)}
        del params
        self._upload_experts()
        self._set_epoch(msg)
        self.compiled, self.cache, self.cache_shape = {}, None, None
        self.incarnation = int(msg["incarnation"])
        self.heartbeat = HeartbeatSender(msg["heartbeat_endpoint"], self.rank, incarnation=self.incarnation,
                                         interval=float(msg["heartbeat_interval"]))
        self.heartbeat.start()
        if msg.get("controller_beacon"):
            from .detector import BeaconWatch
            self.beacon = BeaconWatch(msg["controller_beacon"], self._controller_lost,
                                      interval=float(msg["heartbeat_interval"]),
                                      timeout=float(self.self_fence_after or msg["controller_timeout"]))
            self.beacon.start()
        return {"address": self.transport.address.to_dict(), "pid": os.getpid(),
                "exchange": "python" if self.native is None else "native"}

    def _controller_lost(self, silent_for: float):
        """The controller's beacon fell silent (it crashed, or this host or its host was cut off): this
        rank exits rather than run on in an epoch nobody governs (a new controller starts new workers)."""
        print(f"jem worker rank {self.rank}: no word from the controller for {silent_for:.1f} s; exiting "
              f"(monotonic clock {time.monotonic():.3f})", file=sys.stderr, flush=True)
        os._exit(5)

    def _set_epoch(self, msg: dict):
        """The active mask, its peers (the other active ranks) and log2phy of an init or epoch message."""
        self.active = self.np.asarray(msg["active"], self.np.int32)
        self.active_dev = self.jnp.asarray(self.active)
        self.log2phy = self.jnp.asarray(self.np.asarray(msg["log2phy"], self.np.int32))
        self.peers = [r for r in range(self.num_ranks) if self.active[r] and r != self.rank]
        self.python_exchange.peers = self.peers

    def _upload_experts(self):
        self.experts = self.slots.arrays(self.key_of, self.jnp.asarray)

    # -- the step -------------------------------------------------------------------------------
    def _exchange_failure(self, step):
        """The failed exchange of `step` (ExchangeResult) that made it raise, or None."""
        if self.python_exchange.failure is not None or self.native is None:
            return self.python_exchange.failure
        return self.native.failure(since_seq=int(step) * 2 * len(self.moe_layer_ids) + 1)

    def _exchange_fn(self, step, active):
        if self.native is not None:
            from .exchange_ffi import model_exchange
            return model_exchange(self.native, step, active, len(self.moe_layer_ids))
        return self.python_exchange.model_exchange(step)

    def _program(self, shape):
        """The compiled step of this StepShape (the controller asks for every shape ahead of the
        steps, see compile); not donating the cache: a step abandoned by a failed exchange leaves it
        intact for the step's re-run."""
        if shape in self.compiled:
            return self.compiled[shape]
        jax, jnp = self.jax, self.jnp
        from .spmd import abstract_model
        from .step import make_step, row_abstract
        graphdef, variables = abstract_model(self.cfg, self.spr, jnp.dtype(self.dtype))

        def program(*args):
            # the rank is an argument, not a constant: every rank's program is the same, so with the
            # shared compilation cache one worker compiles it and the others load it
            *args, rank = args
            body = make_step(graphdef, variables, self.key_of, shape, num_ranks=self.num_ranks,
                             slots_per_rank=self.spr, backend=self.backend, rank=rank,
                             exchange_for=self._exchange_fn)
            return body(*args)
        sds = jax.ShapeDtypeStruct
        params = {k: sds(a.shape, a.dtype) for k, a in {**self.dense, **self.experts}.items()}
        cache = jax.eval_shape(lambda: _empty_cache(self.cfg, self.spr, self.dtype, shape))
        compiled = jax.jit(program).lower(params, cache, *row_abstract(shape), sds(self.log2phy.shape, jnp.int32),
                                          sds(self.active_dev.shape, jnp.int32), sds((), jnp.int32),
                                          sds((), jnp.int32)).compile()
        self.compiled[shape] = compiled
        return compiled

    def compile(self, msg: dict):
        """Compiles the programs of these step shapes, so no rank compiles inside a step with deadlines."""
        from .step import StepShape
        if self.cache_dir:      # shared by the workers of one host: one compiles, then the rest load; not
            from ..jax_compat import enable_compilation_cache     # on in init: all compile at once there
            enable_compilation_cache(self.cache_dir)
            self.cache_dir = None
        t = time.perf_counter()
        for sh in msg["shapes"]:
            shape = StepShape.from_list(sh)
            self._program(shape)
            self._ensure_cache(shape)   # its program compiles here too, not in the first step
            self._first_run(shape)
        return {"compile_s": time.perf_counter() - t}

    def _first_run(self, shape):
        """Runs the step once on padding with only this rank live (no transfer, the cache dropped):
        XLA:CPU's first run of a program is slow, and must not fall on a step after a recovery."""
        from .step import padding_rows
        jnp, alone = self.jnp, self.np.arange(self.num_ranks) == self.rank
        peers, self.python_exchange.peers = self.python_exchange.peers, []    # the Python exchange's mask
        try:
            self.np.asarray(self._program(shape)({**self.dense, **self.experts}, self.cache, *map(
                jnp.asarray, padding_rows(shape)), self.log2phy, jnp.asarray(alone, jnp.int32), jnp.int32(0),
                jnp.int32(self.rank))[0])
        finally:
            self.python_exchange.peers = peers

    def _ensure_cache(self, shape):
        if self.cache is None or self.cache_shape != (shape.slots, shape.cache_len):
            self.cache = self.jax.jit(lambda: _empty_cache(self.cfg, self.spr, self.dtype, shape))()
            self.cache_shape = (shape.slots, shape.cache_len)

    def step(self, msg: dict):
        """Runs one step of this rank's rows on its KV-cache slots; returns its next tokens and counts.
        The cache is kept across epochs: a failure elsewhere does not touch this rank's requests."""
        jnp, np = self.jnp, self.np
        from .step import ROW_INPUTS, StepShape, input_rows
        self._check_epoch(msg)
        shape = StepShape.from_list(msg["shape"])
        fn = self._program(shape)
        self._ensure_cache(shape)
        rows = [jnp.asarray(np.asarray(msg[name], np.dtype(ROW_INPUTS[name.removeprefix("decode_")][0])))
                for name in input_rows(shape)]
        self.python_exchange.failure = None
        started = time.perf_counter()
        try:
            nxt, cache, counts = fn({**self.dense, **self.experts}, self.cache, *rows, self.log2phy,
                                    self.active_dev, jnp.int32(msg["step"]), jnp.int32(self.rank))
            nxt = np.asarray(nxt)
        except Exception as e:  # the exchange raised inside the step: report the suspects
            res = self._exchange_failure(msg["step"])
            if res is None:
                raise
            # a transfer that failed outright is evidence against the peer; one that only ran out of
            # time is not (this rank may have been the slow one), like a missing signal, nor one refused
            # because an earlier one to that peer timed out and is still in flight (an orphan), nor
            # one held up by a handshake: on a loaded host those are lateness, and named live peers
            hard = {int(r) for r in res.direct if not any(m in str(res.failed.get(r, "")) for m in LATE)}
            return {"ok": False, "failed_step": True, "direct": sorted(hard), "reason": str(e)[:300],
                    "epoch": self.epoch, "stale": self.stale_counts()}
        self.cache = cache
        return {"ok": True, "tokens": nxt.tolist(), "counts": np.asarray(counts).reshape(-1).tolist(),
                "programs": len(self.compiled), "epoch": self.epoch, "stale": self.stale_counts(),
                "step_s": time.perf_counter() - started}

    def stale_counts(self) -> dict:
        """What fencing dropped on this rank: exchange signals of another epoch or from a rank not
        live (both exchanges'), and steps refused for carrying another epoch."""
        signals = self.transport.stale_signals + (self.native.stale_signals() if self.native is not None else 0)
        return {"signals": signals, "messages": self.stale_messages}

    # -- epochs and weights -----------------------------------------------------------------------
    def install(self, msg: dict):
        """Installs a new epoch: its number (tagged on every exchange seq from now on), peers, active
        mask and log2phy; the expert slots to load follow (load, commit)."""
        from .peers import PeerAddress
        peers = {int(r): PeerAddress.from_dict(a) for r, a in msg["peers"].items()}
        try:
            self.transport.set_peers(peers, timeout=float(msg.get("connect_timeout", 5.0)))
        finally:    # the peers that could be reached are installed either way
            if self.native is not None:
                self.native.install()
        self.epoch = int(msg["epoch"])
        self.transport.set_epoch(self.epoch)
        if self.native is not None:
            self.native.set_epoch(self.epoch)
        self._set_epoch(msg)
        return {}

    def _check_epoch(self, msg: dict):
        """A command that acts in an epoch (step, load, commit) is refused, and counted, when it was
        sent in another one than this rank's: a rank is never counted in an epoch it is not in."""
        if int(msg["epoch"]) != self.epoch:
            self.stale_messages += 1
            raise RuntimeError(f"{msg['type']} of epoch {msg['epoch']} refused: rank {self.rank} is in epoch "
                               f"{self.epoch}")

    def load(self, msg: dict):
        """Phase 1 of a weight move: fetch every slot to load into staging (peer slots by Mooncake
        read, backup blobs from the message). Nothing in the weights region changes yet."""
        self._check_epoch(msg)
        return {"loaded": self.slots.load(msg["loads"])}

    def commit(self, msg: dict):
        """Phase 2: staging -> weights region (after every rank finished its reads), then upload."""
        self._check_epoch(msg)
        self.slots.commit()
        self._upload_experts()
        return {}

    def set_fault(self, msg: dict):
        how = msg["how"]
        if how == "slow":
            self.transport.set_fault(delay_s=float(msg.get("delay_s", 0.2)))
        elif how == "drop":
            self.transport.set_fault(drop=True)
        else:
            raise ValueError(f"fault {how!r}: a worker injects slow or drop (the controller kills or stops it)")
        if self.native is not None:
            self.native.sync_fault()
        return {}

    # -- loop -------------------------------------------------------------------------------------
    def run(self, idle_timeout: float):
        from .control import ControlTimeout, message
        self.client.notify(message("hello", rank=self.rank, pid=os.getpid()))
        handlers = {"init": self.init, "compile": self.compile, "step": self.step, "install": self.install,
                    "load": self.load, "commit": self.commit, "fault": self.set_fault}
        last = time.monotonic()
        while True:
            try:
                msg = self.client.recv(timeout=1.0)
            except ControlTimeout:
                if time.monotonic() - last > idle_timeout:
                    return 3        # the controller is gone: exit rather than linger
                continue
            last = time.monotonic()
            if msg["type"] == "shutdown":
                if msg.get("incarnation", self.incarnation) != self.incarnation:
                    continue        # meant for a fenced process of this rank, not this one
                return 0
            if msg["type"] == "ping":
                continue
            try:
                out = {"ok": True, **handlers[msg["type"]](msg)}
                reply = message("reply", rank=self.rank, id=msg.get("id", 0), **out)
            except Exception as e:  # report, keep serving: the controller decides
                reply = message("reply", rank=self.rank, id=msg.get("id", 0), ok=False,
                                reason=f"{type(e).__name__}: {e}"[:500])
            self.client.notify(reply)
            last = time.monotonic()     # a long handler (a compile) is not the controller's silence

    def close(self, exiting: bool = False):
        """Stops the threads and the control socket; `exiting`: the process ends next, so the kernel
        reclaims Mooncake's memory and sockets and its orderly teardown (~0.8 s) is skipped."""
        threads = [t for t in (self.heartbeat, self.beacon) if t is not None]
        for t in threads:
            t.request_stop()        # both wind down in the same tick
        for t in threads:
            t.stop()
        if not exiting:
            if self.native is not None:
                self.native.close()
            if self.transport is not None:
                self.transport.close()
        self.client.close()


def watch_parent(parent: int, interval: float = 0.2):
    """Exits this process when `parent` exits (this process is re-parented). Not PR_SET_PDEATHSIG:
    that fires when the *thread* that forked us exits, and servers build engines in short threads."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(4)
    threading.Thread(target=watch, daemon=True, name="jem-parent-watch").start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jem worker", description="one rank of the multi-process runtime")
    ap.add_argument("--controller", required=True, help="the controller's endpoint, tcp://HOST:PORT")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", help="address Mooncake listens on")
    ap.add_argument("--idle-timeout", type=float, default=120.0,
                    help="exit after this many seconds without a word from the controller")
    ap.add_argument("--self-fence-after", type=float, default=None,
                    help="exit after this many seconds without the controller's beacon (default: the "
                         "controller's setting, its heartbeat timeout for workers on other hosts)")
    ap.add_argument("--die-with-parent", action="store_true",
                    help="exit when the process that started this one exits (checked every 0.2 s)")
    args = ap.parse_args(argv)
    if args.die_with_parent:
        watch_parent(os.getppid())
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    import logging
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)   # failures are reported, not logged
    w = Worker(args.controller, args.rank, args.host, self_fence_after=args.self_fence_after)
    code = 1
    try:
        code = w.run(args.idle_timeout)
    finally:
        w.close(exiting=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)      # skip interpreter teardown: Mooncake's threads do not survive it cleanly


if __name__ == "__main__":
    sys.exit(main())
