"""The engine end to end on one GPU: the small preset (bfloat16), generate with the EP ops on the
pure-JAX backend and on the FFI kernels; same greedy tokens, and the time per decode step.

  JEM_FFI_CUDA_LIBRARY=prebuilt/libjem_ffi_cuda.so python3 benchmarks/gpu_engine.py"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax_elastic_moe as jem  # noqa: E402
from jax_elastic_moe.ep import ffi  # noqa: E402

if os.environ.get("JEM_FFI_CUDA_LIBRARY"):
    ffi.load_library(os.environ["JEM_FFI_CUDA_LIBRARY"], "CUDA")
print(jax.devices()[0].device_kind, "ffi on gpu:", ffi.available("gpu"))
rng = np.random.RandomState(0)
prompts = [rng.randint(2, 2000, size=64).tolist() for _ in range(32)]
tokens = {}
for backend in ("jax", "ffi"):
    with jem.Engine.from_config("small", num_ranks=1, dtype="bfloat16", ep_backend=backend) as eng:
        eng.generate(prompts, max_new_tokens=4, stop_token_ids=[])
        t = time.perf_counter()
        out = eng.generate(prompts, max_new_tokens=64, stop_token_ids=[])
        dt = time.perf_counter() - t
        tokens[backend] = [o.token_ids for o in out]
        n = sum(len(o.token_ids) for o in out)
        print(f"{backend}: {n} tokens in {dt:.3f} s = {n / dt:.0f} tokens/s (batch 32, prompt 64, 64 new)")
same = np.mean([a == b for a, b in zip(tokens["jax"], tokens["ffi"])])
print(f"sequences with identical greedy tokens, jax vs ffi: {same:.2f}")
