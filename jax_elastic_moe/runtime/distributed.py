"""The non-elastic multi-process baseline: the model and placement of the mooncake runtime, one process
per rank, but over jax.distributed (XLA's CPU collectives over gloo) with the whole step in one
shard_map over the global mesh and the MoE exchange as all_to_all (SpmdRunner over every process's
device). It shares fate: a rank that dies takes every other down (or hangs them), which is what the
mooncake runtime is built to avoid; its speed is what that robustness is measured against.

    result = run_baseline(config, dtype, num_ranks, placement, seed, prompts, new_tokens, repeats)

Greedy generation of a static batch (rows split evenly over the ranks), the same random weights as
the mooncake workers (`random_params(cfg, dtype, seed)`). One warm-up run compiles; then `repeats`
timed runs. Rank 0 reports: tokens/s per run and the output tokens of every prompt.

  python -m jax_elastic_moe.runtime.distributed --spec SPEC.json --rank R --port P   (one rank)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

__all__ = ["run_baseline"]


def _generate(runner, prompts, new_tokens: int, num_ranks: int):
    """Greedy generation of `prompts` (equal lengths) with the engine's step programs and scheduler:
    every process takes the same decisions and runs the same steps. Returns the tokens per prompt."""
    import numpy as np
    from jax.experimental import multihost_utils

    from ..scheduler import Request, SamplingParams, Scheduler
    rows = -(-len(prompts) // num_ranks)            # every request in a slot from the start
    s = len(prompts[0])
    sched = Scheduler(list(range(num_ranks)), rows, rows, max_chunk=s, cache_len=s + new_tokens)
    reqs = [Request(i, [int(t) for t in p], SamplingParams(new_tokens)) for i, p in enumerate(prompts)]
    sched.add(reqs)

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    while sched.unfinished():
        batch = sched.next_batch()
        nxt, _ = runner.run(batch.shape, batch.rows, fetch=gather)
        sched.commit(batch, nxt)
    return [r.out for r in reqs]


def _rank_main(spec_path: str, rank: int, port: int) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    with open(spec_path) as f:
        spec = json.load(f)
    n = int(spec["num_ranks"])
    jax.distributed.initialize(f"127.0.0.1:{port}", n, rank, initialization_timeout=120)
    from ..config import from_hf_dict, read_config_dict
    from ..config import DTYPES, resolve_preset
    from ..model.loader import random_params
    from ..placement import Placement
    from .spmd import SpmdRunner
    cfg = from_hf_dict(read_config_dict(resolve_preset(spec["config"])))
    dtype = DTYPES[spec["dtype"]]
    p = spec["placement"]
    placement = Placement(phy2log=np.asarray(p["phy2log"], np.int32), log2phy=np.asarray(p["log2phy"], np.int32),
                          logcnt=np.asarray(p["logcnt"], np.int32), num_ranks=n,
                          slots_per_rank=int(p["slots_per_rank"]))
    params = random_params(cfg, dtype, int(spec["seed"]))
    runner = SpmdRunner.create(cfg, dtype, jax.devices(), placement, params, spec.get("backend", "auto"))
    prompts, new_tokens = spec["prompts"], int(spec["new_tokens"])
    start = time.perf_counter()
    outputs = _generate(runner, prompts, new_tokens, n)      # warm-up: compiles
    runs = [{"wall_s": time.perf_counter() - start, "warmup": True}]
    for _ in range(int(spec["repeats"])):
        start = time.perf_counter()
        again = _generate(runner, prompts, new_tokens, n)
        wall = time.perf_counter() - start
        runs.append({"wall_s": wall, "tokens_per_s": len(prompts) * new_tokens / wall, "same": again == outputs})
    if rank == 0:
        with open(spec["result"], "w") as f:
            json.dump({"outputs": outputs, "runs": runs}, f)
    jax.distributed.shutdown()
    return 0


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_baseline(config: str, dtype: str, num_ranks: int, placement, seed: int, prompts, new_tokens: int,
                 repeats: int, timeout: float = 1800.0, backend: str = "auto") -> dict:
    """Runs the baseline in `num_ranks` fresh processes (killed by pid when done or past `timeout`).
    Returns {"outputs": tokens per prompt, "runs": [{"wall_s", "tokens_per_s", "same"}], ...}; the
    first run is the warm-up (it compiles)."""
    with tempfile.TemporaryDirectory(prefix="jem-baseline-") as tmp:
        spec = {"config": config, "dtype": dtype, "num_ranks": num_ranks, "seed": seed,
                "prompts": [[int(t) for t in p] for p in prompts],
                "new_tokens": new_tokens, "repeats": repeats, "backend": backend,
                "result": os.path.join(tmp, "result.json"),
                "placement": {"phy2log": placement.phy2log.tolist(), "log2phy": placement.log2phy.tolist(),
                              "logcnt": placement.logcnt.tolist(), "slots_per_rank": placement.slots_per_rank}}
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        port = _free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        procs = [subprocess.Popen([sys.executable, "-m", "jax_elastic_moe.runtime.distributed", "--spec", spec_path,
                                   "--rank", str(r), "--port", str(port)], env=env, stdin=subprocess.DEVNULL)
                 for r in range(num_ranks)]
        deadline = time.monotonic() + timeout
        try:
            for proc in procs:
                proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"the jax.distributed baseline did not finish within {timeout} s") from e
        finally:
            for proc in procs:      # shared fate: one gone, the rest are killed too
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        codes = [proc.returncode for proc in procs]
        if any(codes):
            raise RuntimeError(f"jax.distributed baseline ranks exited with {codes}")
        with open(spec["result"]) as f:
            return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_elastic_moe.runtime.distributed", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    from .worker import watch_parent
    watch_parent(os.getppid())
    return _rank_main(args.spec, args.rank, args.port)


if __name__ == "__main__":
    sys.exit(main())
