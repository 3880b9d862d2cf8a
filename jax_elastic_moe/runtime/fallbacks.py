"""Programs for the meshes that failures would leave (spmd mode), ready before the failure.

An SPMD program names mesh positions, never devices, so a step compiled for one set of survivors is
serialized (`Portable`) and loaded onto any other set of the same size with its device ids remapped:
one compile per mesh size, then ~0.06 s per program to load, against ~1.2 s to compile. In the
background, `FallbackPrograms` compiles every step shape for the mesh sizes up to `depth` failures
away and loads the decode step onto the survivor sets one failure away, then two or more away while
under a budget; a set not loaded in advance is loaded when its failure comes, and the prefill steps
load when first used. Programs of survivor sets that
no failure can leave any more are freed only while the engine is idle (a free holds the GIL ~15 ms).

`Portable` uses private JAX APIs, so it lives in jax_compat.py with the version check; a program that
cannot be moved is compiled at the failure instead."""
from __future__ import annotations

import itertools
import math
import threading
import time
import warnings
from typing import Callable, Iterator

import numpy as np


def memory_mappings() -> tuple[int, int]:
    """(memory mappings of this process, the most the kernel allows); (0, 0) where unknown. Every
    loaded XLA:CPU executable maps its code sections; past vm.max_map_count LLVM aborts the process."""
    try:
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return used, int(f.read())
    except OSError:
        return 0, 0


def within_mapping_budget(share: float = 0.5) -> bool:
    used, limit = memory_mappings()
    return limit == 0 or used < share * limit


def likely_failures(alive: list[int], m: int, limit: int | None, rng) -> "Iterator[tuple]":
    """Sets of `m` ranks of `alive` to prepare for, most likely first: every set when there are at
    most `limit` (None: no limit) in a random order for m > 1, else `limit` distinct random ones,
    drawn without listing all C(len(alive), m) of them (C(32, 16) is 6e8)."""
    total = math.comb(len(alive), m)
    if limit is None or total <= limit:
        sets = list(itertools.combinations(alive, m))
        order = range(len(sets)) if m == 1 else rng.permutation(len(sets))
        yield from (sets[i] for i in order)
        return
    seen: set = set()
    for _ in range(20 * limit):
        if len(seen) >= limit:
            return
        dead = tuple(sorted(np.asarray(alive)[rng.choice(len(alive), m, replace=False)].tolist()))
        if dead not in seen:
            seen.add(dead)
            yield dead


class FallbackPrograms:
    """Programs loaded per survivor set (frozenset of global ranks) for the engine's step shapes.

    Budget: survivor sets are prepared in order of likelihood (every single failure, then pairs in a
    seeded random order, and so on), at most `budget` sets beyond the single failures, and never
    while this process holds more than half the memory mappings the kernel allows. A failure whose
    set was not prepared loads the programs then (or compiles them): the engine never aborts on its
    own bookkeeping.

    compile_for(size, dead) -> {shape: compiled} compiles the steps for a mesh of `size` devices over
    the survivors of failing `dead` (None when the controller could not serve that failure);
    devices: global rank -> device."""

    def __init__(self, depth: int, devices: list, budget: int = 64):
        self.depth, self.devices, self.budget = depth, list(devices), budget
        self.loaded: dict[frozenset, dict] = {}     # survivor ranks -> {shape: loaded program}
        self.portable: dict[int, dict] = {}         # mesh size -> {shape: Portable}
        self.stale: list[dict] = []                 # loaded programs no longer of use, to free
        self._done_for = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._freer: threading.Thread | None = None
        self.report: dict = {}     # what the last background preparation did (sizes, sets, budget)

    def start(self, alive: list[int], shapes: list, compile_for: Callable):
        """In the background: programs for every mesh size up to `depth` failures away from `alive`."""
        if self._thread is not None and self._thread.is_alive():
            return
        key = (tuple(alive), tuple(shapes))
        if key == self._done_for:
            return
        self._cancel = cancel = threading.Event()
        depth = min(self.depth, len(alive) - 1)
        self.report = {"alive": len(alive), "depth": depth, "compiled_sizes": [], "compile_s": 0.0,
                       "loaded_sets": {}, "stopped_by": None, "mappings": None}

        def prepare_size(m: int) -> bool:
            size = len(alive) - m
            have = self.portable.setdefault(size, {})
            if all(s in have for s in shapes):
                return True
            for dead in itertools.islice(itertools.combinations(alive[::-1], m), 16):
                try:
                    got = compile_for(size, list(dead))
                except Exception as e:      # a program that cannot be serialized: compile at the failure
                    warnings.warn(f"fallback programs for {size} devices not prepared ({e!r})")
                    return False
                if got is not None:
                    have.update(got)
                    return True
            return False

        # loaded ahead per survivor set: the decode step only (what the survivors run first); the
        # prefill shapes load from the same Portable programs when first used (~0.06 s each): every
        # loaded XLA:CPU executable holds memory mappings, and the budget goes further this way
        first = [s for s in shapes if getattr(s, "kind", None) == "decode"] or list(shapes)

        def work():
            t0 = time.perf_counter()
            sizes = [m for m in range(1, depth + 1) if not cancel.is_set() and prepare_size(m)]
            self.report["compiled_sizes"] = sorted(len(alive) - m for m in sizes)
            self.report["compile_s"] = time.perf_counter() - t0
            budget = self.budget
            rng = np.random.RandomState(0)
            for m in sizes:
                for dead in likely_failures(alive, m, budget if m > 1 else None, rng):
                    if cancel.is_set():
                        return
                    if (m > 1 and budget <= 0) or not within_mapping_budget():
                        self.report["stopped_by"] = "sets budget" if budget <= 0 else "memory mappings"
                        break
                    keep = frozenset(alive) - set(dead)
                    if keep not in self.loaded:
                        got = self.load(sorted(keep), first)
                        if got is None:
                            break
                        self.loaded[keep] = got
                        self.report["loaded_sets"][m] = self.report["loaded_sets"].get(m, 0) + 1
                        budget -= m > 1
            self.report["mappings"] = list(memory_mappings())
            self._done_for = key
        self._thread = threading.Thread(target=work, daemon=True, name="jem-precompile")
        self._thread.start()

    def load(self, keep: list[int], shapes: list) -> dict | None:
        """The steps `shapes` loaded onto the devices of ranks `keep` from programs compiled for another
        mesh of that size; None when some step was never compiled for that size."""
        ready = self.portable.get(len(keep), {})
        if not shapes or any(s not in ready for s in shapes):
            return None
        devices = [self.devices[r] for r in keep]
        try:
            return {s: ready[s].load(devices) for s in shapes}
        except Exception as e:              # an executable this jaxlib cannot move: compile instead
            warnings.warn(f"precompiled steps could not be loaded onto new devices ({e!r}); compiling")
            return None

    def take(self, keep: list[int], shapes: list) -> dict | None:
        """At a failure: the decode program for survivors `keep` (loaded now if not ready; None when
        this mesh size has no programs); the background work stops, and programs of sets outside
        `keep` become stale. loader_for(keep) loads the other shapes when first used."""
        self._cancel.set()
        got = self.loaded.pop(frozenset(keep), None)
        if got is None:
            got = self.load(keep, [s for s in shapes if getattr(s, "kind", None) == "decode"] or shapes)
        self.stale += [self.loaded.pop(k) for k in list(self.loaded) if not k <= set(keep)]
        return got

    def loader_for(self, keep: list[int]):
        """name -> that program loaded onto the devices of `keep`, or None (then it is compiled)."""
        ready, devices = self.portable.get(len(keep), {}), [self.devices[r] for r in keep]

        def load(name):
            if name not in ready:
                return None
            try:
                return ready[name].load(devices)
            except Exception as e:
                warnings.warn(f"a precompiled step could not be loaded onto new devices ({e!r}); compiling")
                return None
        return load

    def wait(self) -> int:
        if self._thread is not None:
            self._thread.join()
        return len(self.loaded)

    def free_when_idle(self, busy: Callable[[], bool]):
        """Frees the stale programs one at a time, in the background, while busy() is False."""
        def free():
            while self.stale and not busy():
                try:
                    self.stale.pop()
                except IndexError:          # emptied by close()
                    return
                time.sleep(0.005)
        if self.stale and (self._freer is None or not self._freer.is_alive()):
            self._freer = threading.Thread(target=free, daemon=True, name="jem-free-programs")
            self._freer.start()

    def close(self):
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()
        self.stale.clear()
        self.loaded.clear()
