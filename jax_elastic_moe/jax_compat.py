"""The private JAX APIs the engine relies on, in one place, checked against the JAX version.

One feature needs them: moving a compiled SPMD step onto other devices (`Portable`, used by
runtime/fallbacks.py), which reads the pickle of a serialized executable:
  - `jax.experimental.serialize_executable._JaxPjrtUnpickler` and its persistent ids: ("device", id)
    for every device and ("exec", bytes) for the executable itself, which Portable remaps, and
    ("client",), left to JAX (`PERSISTENT_IDS`);
  - `jax._src.compiler.get_compile_options` to give the executable its new device assignment;
  - `jax._src.config.enable_compilation_cache` as a thread-local context (`fresh_compile`): XLA:CPU
    cannot serialize again an executable it read from the persistent compilation cache (the copy
    loads, then fails at its first run with "NOT_FOUND: Function ... not found").
They were checked on the versions in `CHECKED_JAX`. On another version a warning says so once; if the
format changed, loading raises and the caller compiles instead (slower, still correct).
tests/test_jax_compat.py fails loudly when the format changes (unknown persistent ids, ids no longer
seen, or a loaded program that gives other results).
"""
from __future__ import annotations

import io
import os
import warnings

import jax
import numpy as np

CHECKED_JAX = ("0.10.2",)
PERSISTENT_IDS = ("client", "device", "exec")      # kinds of persistent id in the pickle
REMAPPED_IDS = ("device", "exec")                   # those Portable rewrites to name the new devices

try:
    from jax._src import compiler as _compiler
    from jax._src import config as _config
    from jax.experimental import serialize_executable as _serialize
    _Unpickler = _serialize._JaxPjrtUnpickler
    _MISSING = None
except (ImportError, AttributeError) as e:     # pragma: no cover - depends on the JAX version
    _compiler = _serialize = _config = None
    _Unpickler = object
    _MISSING = f"jax {jax.__version__} lacks a private API Portable needs ({e})"

_warned = False


class CompatError(RuntimeError):
    """This JAX version does not offer what a private-API feature needs."""


def check_portable():
    """Raises CompatError when this JAX lacks the private APIs of `Portable`; warns once when its
    version is not one they were checked on."""
    global _warned
    if _MISSING is not None:
        raise CompatError(_MISSING + "; programs are compiled at each failure instead")
    if jax.__version__ not in CHECKED_JAX and not _warned:
        _warned = True
        warnings.warn(f"jax {jax.__version__}: moving compiled programs between devices uses private JAX "
                      f"APIs checked on {', '.join(CHECKED_JAX)} only (jax_elastic_moe/jax_compat.py)",
                      RuntimeWarning, stacklevel=3)


def fresh_compile():
    """A context (this thread only) in which programs are compiled, never read from JAX's persistent
    compilation cache: programs meant for `Portable` are compiled in it."""
    check_portable()
    return _config.enable_compilation_cache(False)


def enable_compilation_cache(path: str):
    """JAX's persistent compilation cache in `path`, for every program however fast it compiled."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _OntoDevices(_Unpickler):
    """Unpickles a serialized executable onto other devices: each device id of the pickle (the
    executable's, and those of its argument shardings) maps to the device at the same mesh position."""

    def __init__(self, data: bytes, mapping: dict, devices: list):
        super().__init__(io.BytesIO(data), devices[0].client, devices)
        self._mapping, self._devices = mapping, devices
        self.seen: set[str] = set()             # kinds of persistent ids met (the format test reads it)

    def persistent_load(self, pid):
        self.seen.add(pid[0])
        if pid[0] == "device":
            return self._mapping[pid[1]]
        if pid[0] == "exec":        # the executable's own device assignment names the new devices too
            options = _compiler.get_compile_options(
                num_replicas=1, num_partitions=len(self._devices),
                device_assignment=np.array(self._devices)[None, :])
            return self.backend.deserialize_executable(pid[1], self.execution_devices, options)
        return super().persistent_load(pid)     # ("client",): JAX's own handling


class Portable:
    """A compiled step that loads onto any mesh of as many devices as the one it was compiled for.

    The SPMD program names mesh positions, never devices, so one compile per mesh size serves every
    set of survivors of that size; loading (deserializing) costs a small fraction of compiling.
    `compiled` must come from a compile in `fresh_compile()`."""

    def __init__(self, compiled, devices):
        check_portable()
        self.data, self.in_tree, self.out_tree = _serialize.serialize(compiled)
        self.devices = list(devices)
        self.seen: set[str] = set()             # persistent id kinds met by the last load

    def load(self, devices):
        devices = list(devices)
        if len(devices) != len(self.devices):
            raise ValueError(f"compiled for {len(self.devices)} devices, asked to load on {len(devices)}")
        mapping = {a.id: b for a, b in zip(self.devices, devices)}
        unpickler = _OntoDevices(self.data, mapping, devices)
        exe, args, no_kwargs = unpickler.load()
        self.seen = unpickler.seen
        return jax.stages.Compiled(exe.load(), [], self.in_tree.unflatten(args), self.out_tree,
                                   no_kwargs=no_kwargs)
