"""The EP exchange inside XLA: `jem_exchange`, a C++ FFI op that drives Mooncake itself (csrc/exchange.h).

The Python `Transport.exchange` (runtime/transport/) is the reference and the fallback: same region
layout, same payload format, same seq rule, so ranks using either understand each other. The op
never calls back into Python: packing into registered staging, the writes, the signals, the wait
(short spin, yields, short sleeps) and the deadline are C++.

    native = open_native_exchange(transport)   # None (and a warning) when it cannot be used
    native.install()                           # after every transport.set_peers(...)
    outs, recv_counts = native(arrays, send_counts, active, step, seq_stride=..., seq_offset=...)
    native.failure()                           # ExchangeResult of the op that raised, for the report

Reaching Mooncake from C++: `TransferEngine.get_engine_ptr()` gives the mooncake::TransferEngine*;
the module `_exchange_cpu` leaves that class's methods undefined and they resolve against the
binding's engine.so, which is promoted to global symbol scope (dlopen RTLD_NOLOAD | RTLD_GLOBAL)
before the import. Only the Mooncake versions in SUPPORTED_MOONCAKE are tried (the struct layouts of
csrc/mooncake_abi.h come from their headers), and a self-test write to this rank's own segment must
arrive before the op is used.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
import time
import warnings

import numpy as np

from .layout import aligned_buffer
from .peers import ExchangeResult
from .transport import DEFAULT_CONNECT_TIMEOUT

__all__ = ["SUPPORTED_MOONCAKE", "ExchangeUnavailable", "NativeExchange", "load", "model_exchange",
           "open_native_exchange"]

TARGET = "jem_exchange"
# Mooncake wheels whose C++ ABI csrc/mooncake_abi.h declares (version prefixes); pyproject pins them.
SUPPORTED_MOONCAKE = ("0.3.13",)
_WHEELS = ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine")
_STAGING_TAIL = 128  # a signal word and a probe word after each peer's staging slot
# XLA platform -> module: the same context functions; the CUDA one's handler takes GPU buffers.
_MODULES = {"cpu": "jax_elastic_moe._exchange_cpu", "CUDA": "jax_elastic_moe._exchange_cuda"}
_modules: dict = {}


class ExchangeUnavailable(RuntimeError):
    """The native exchange cannot be used here (module not built, Mooncake version, failed self-test)."""


def mooncake_version() -> str | None:
    for name in _WHEELS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _xla_platform(platform: str | None) -> str:
    import jax
    name = (platform or jax.default_backend()).lower()
    return {"cpu": "cpu", "gpu": "CUDA", "cuda": "CUDA"}.get(name, name)


def load(platform: str | None = None):
    """The exchange module of `platform` ('cpu' or 'CUDA'; default: jax's default backend), its
    handler registered with XLA as `jem_exchange` for that platform (once)."""
    platform = _xla_platform(platform)
    if platform not in _MODULES:
        raise ExchangeUnavailable(f"no native exchange for platform {platform!r}")
    version = mooncake_version()
    if version is None or not version.startswith(SUPPORTED_MOONCAKE):
        if os.environ.get("JEM_EXCHANGE_ANY_MOONCAKE") != "1":
            raise ExchangeUnavailable(f"Mooncake {version} is not a version the native exchange was built for "
                                      f"({', '.join(SUPPORTED_MOONCAKE)}); JEM_EXCHANGE_ANY_MOONCAKE=1 tries anyway")
    if platform in _modules:
        return _modules[platform]
    try:
        import mooncake.engine
        ctypes.CDLL(mooncake.engine.__file__, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        module = importlib.import_module(_MODULES[platform])
    except (ImportError, OSError) as e:
        raise ExchangeUnavailable(f"the native exchange module cannot be loaded ({type(e).__name__}: {e}); "
                                  "rebuild with `pip install -e . --no-build-isolation`") from e
    import jax
    jax.ffi.register_ffi_target(TARGET, module.handler(), platform=platform)
    _modules[platform] = module
    return module


class NativeExchange:
    """The C++ exchange context of one rank's `Transport` (same engine, receive region and layout).

    Args:
      transport: this rank's Transport; its peers are installed by `install()` after set_peers.
      timeout: the op's deadline in seconds, counted from the op's start (default the transport's
        exchange_timeout).
      platform: where the op's operands live: 'cpu' or 'CUDA' (staged through pinned host memory);
        default jax's default backend.
    """

    def __init__(self, transport, timeout: float | None = None, platform: str | None = None):
        self._mod = load(platform)
        self.transport = transport
        layout = transport.layout
        self.timeout = float(transport.exchange_timeout if timeout is None else timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._stride = layout.slot_bytes + _STAGING_TAIL
        # Registered with the Transport: it stays alive (and registered) as long as the engine, so
        # transfers abandoned by the op can still read it.
        self._staging = transport.register_array(aligned_buffer(layout.num_ranks * self._stride))
        recv = transport.recv_region
        self.id = self._mod.create(transport.engine_ptr(), transport.rank, layout.num_ranks, layout.buffers_per_source,
                                   layout.slot_bytes, layout.probes_offset, layout.slots_offset,
                                   int(recv.ctypes.data), int(recv.nbytes), int(self._staging.ctypes.data),
                                   self._stride)
        self._closed = False

    def self_test(self, timeout: float = 2.0, segment: str | None = None):
        """One 8-byte write through Mooncake from C++ into this rank's own region (`segment`: this
        rank's, by default); raises ExchangeUnavailable when it does not arrive (an ABI mismatch with
        the loaded Mooncake)."""
        segment = self.transport.address.segment if segment is None else segment
        why = self._mod.self_test(self.id, segment, int(timeout * 1e9))
        if why:
            raise ExchangeUnavailable(f"native exchange self-test failed: {why}")

    def install(self, timeout: float = DEFAULT_CONNECT_TIMEOUT):
        """Copies the Transport's peer table (addresses, open/failed state) and fault settings into the
        context. Call after every `transport.set_peers`: segments are opened here, never in the op.
        A peer the op abandoned transfers to is re-admitted once Mooncake resolved them, waiting up
        to `timeout` seconds in all (as set_peers does); until then it stays failed."""
        table = self.transport.peer_table()
        deadline = time.monotonic() + timeout
        for rank in range(self.transport.num_ranks):
            if rank == self.transport.rank:
                continue
            drain_ns = int(max(0.0, deadline - time.monotonic()) * 1e9)
            if rank in table:
                address, state, reason = table[rank]
                self._mod.set_peer(self.id, rank, address.segment, address.recv_base, state == "open", reason,
                                   drain_ns)
            else:
                self._mod.set_peer(self.id, rank, "", 0, False, f"rank {rank} is not in the installed peer table", 0)
        blocker = self.transport.engine_blocker()
        self._mod.set_blocked(self.id, -1 if blocker is None else int(blocker))
        self.sync_fault()

    def set_epoch(self, epoch: int):
        """The epoch of every seq the op writes and accepts from now on (layout.with_epoch): a signal
        of another epoch, or from a rank not live, is dropped and counted (stale_signals)."""
        self._mod.set_epoch(self.id, int(epoch))

    def stale_signals(self) -> int:
        """Signals that arrived from another epoch or from a rank not live, and were dropped."""
        return int(self._mod.stale_signals(self.id))

    def sync_fault(self):
        """Applies the Transport's fault injection (drop, delay_s: a FaultInjectingTransport's) to the op
        too; a plain Transport injects none."""
        drop, delay_s = getattr(self.transport, "drop", False), getattr(self.transport, "delay_s", 0.0)
        self._mod.set_fault(self.id, bool(drop), int(delay_s * 1e9))

    def failure(self, since_seq: int = 1) -> ExchangeResult | None:
        """What the last op reported when it failed (failed: rank -> reason; silent: named only for a
        missing signal); None when it succeeded or ran for a seq below `since_seq` (an older step)."""
        seq, records = self._mod.last_failure(self.id)
        if not records or seq < since_seq:
            return None
        result = ExchangeResult()
        for rank, kind, reason in records:
            result.failed[int(rank)] = reason
            if kind == "silent":
                result.silent.add(int(rank))
        return result

    def last_elapsed(self) -> float:
        """Seconds the last op spent inside C++ (from its start to its return)."""
        return self._mod.last_elapsed_ns(self.id) * 1e-9

    def peers(self) -> dict[int, tuple[str, str, int]]:
        """rank -> (state, reason, pending abandoned transfers) as the op sees its peers."""
        return dict(self._mod.peers(self.id))

    def reclaim(self) -> int:
        """Polls transfers the op abandoned; returns how many Mooncake has not resolved yet."""
        return int(self._mod.reclaim(self.id))

    def __call__(self, arrays, send_counts, active, step, *, seq_stride: int, seq_offset: int):
        """Inside jit: sends rows [0, send_counts[d]) of block d of every array [N, T, ...] to rank d and
        returns (arrays received, stacked by source with zeros past recv_counts, recv_counts [N] int32).
        send_counts, active [N] int32; step int32 scalar; seq = step * seq_stride + seq_offset."""
        import jax
        import jax.numpy as jnp
        arrays = list(arrays)
        shapes = [jax.ShapeDtypeStruct((self.transport.num_ranks,), jnp.int32)]
        shapes += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
        call = jax.ffi.ffi_call(TARGET, shapes, has_side_effect=True)
        out = call(jnp.asarray(send_counts, jnp.int32), jnp.asarray(active, jnp.int32), jnp.asarray(step, jnp.int32),
                   *arrays, context=np.int64(self.id), seq_stride=np.int64(seq_stride), seq_offset=np.int64(seq_offset),
                   timeout_ns=np.int64(int(self.timeout * 1e9)))
        return list(out[1:]), out[0]

    def close(self, timeout: float = 1.0):
        """Gives abandoned transfers up to `timeout` s to resolve, then drops the context (the staging
        stays registered with the Transport until it closes)."""
        if self._closed:
            return
        self._closed = True
        end = time.monotonic() + timeout
        while self.reclaim() > 0 and time.monotonic() < end:
            time.sleep(0.01)
        self._mod.destroy(self.id)


def open_native_exchange(transport, timeout: float | None = None) -> NativeExchange | None:
    """A self-tested NativeExchange for `transport`, or None with a warning saying why the Python
    exchange is used instead. JEM_EXCHANGE=python forces the fallback."""
    if os.environ.get("JEM_EXCHANGE", "native") == "python":
        return None
    try:
        native = NativeExchange(transport, timeout)
        native.self_test()
        return native
    except ExchangeUnavailable as e:
        warnings.warn(f"{e}; using the Python exchange", RuntimeWarning, stacklevel=2)
        return None


def model_exchange(native: NativeExchange, step, active, num_moe_layers: int):
    """EPContext.exchange for the MoE layers of one traced step: phase 0 sends [send_x, send_slot,
    send_w] (rows with a slot >= 0 are the ones to send, packed first), phase 1 returns each source's
    rows (as many as came from it in phase 0). seq = step * 2 * num_moe_layers + 2 * layer + phase + 1,
    the worker's numbering. Received slots past the rows that came are -1, as dispatch pads them."""
    import jax.numpy as jnp
    received = {}

    def exchange(arrays, moe_layer, phase):
        if phase == 0:
            counts = jnp.sum(jnp.any(arrays[1] >= 0, axis=-1), axis=-1).astype(jnp.int32)
        else:
            counts = received.pop(moe_layer)
        outs, got = native(arrays, counts, active, step, seq_stride=2 * num_moe_layers,
                           seq_offset=2 * moe_layer + phase + 1)
        if phase == 0:
            received[moe_layer] = got
            rows = jnp.arange(outs[1].shape[1])
            outs[1] = jnp.where(rows[None, :, None] < got[:, None, None], outs[1], -1)
        return outs
    return exchange
