"""One-process elastic path on 8 fake CPU devices: fail ranks mid-generation, keep every request."""
import os
import time

import jax

import numpy as np
import pytest

import jax_elastic_moe as jem
from jax_elastic_moe.placement import validate
from jax_elastic_moe.runtime.controller import EngineDead

PROMPTS = [[3, 4, 5], [10, 20, 30, 40, 50, 60], [7], [100, 101], [9, 9, 9, 9], [42], [250, 3], [17, 18, 19]]


@pytest.fixture(scope="module")
def reference_tokens():
    with jem.Engine.from_config("tiny", num_ranks=1, seed=0) as eng:
        return [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])]


def check_weights(eng):
    """Every slot of the live mesh holds exactly the weights of the expert the placement names."""
    run = eng._runtime.runner
    for key, arr in run.params.items():
        path = key.split("/")
        if path[-1] not in ("w_gate", "w_up", "w_down"):
            continue
        m = run.moe_layer_ids.index(int(path[1]))
        logical = eng._backup[("layers", int(path[1]), "mlp", path[-1])]
        got = np.asarray(arr)
        for s, e in enumerate(run.placement.phy2log[m]):
            want = logical[e] if e >= 0 else np.zeros_like(logical[0])
            assert np.array_equal(got[s], want), (key, s, e)


def test_fail_one_then_two_more(reference_tokens):
    with jem.Engine.from_config("tiny", num_ranks=8, redundant_experts=8, seed=0) as eng:
        eng.fail_rank(3, at_step=4)
        out = eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        assert [r.token_ids for r in out] == reference_tokens
        st = eng.stats()
        assert st["epoch"] == 1 and st["alive_ranks"] == [0, 1, 2, 4, 5, 6, 7]
        rec = st["recoveries"][0]
        # 8 requests over 8 ranks: only the one on rank 3 is prefilled again; the others keep their cache
        assert rec["failed_ranks"] == [3] and rec["requests_requeued"] == 1 and rec["cache_kept"]
        assert rec["total_s"] > 0 and rec["compile_s"] > 0
        validate(eng.placement, eng.alive)
        check_weights(eng)

        eng.fail_rank(0, at_step=2)
        eng.fail_rank(6, at_step=2)
        out = eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        assert [r.token_ids for r in out] == reference_tokens
        st = eng.stats()
        assert st["alive_ranks"] == [1, 2, 4, 5, 7] and len(st["recoveries"]) == 2
        assert st["recoveries"][1]["failed_ranks"] == [0, 6] 
        # 8 requests over 7 ranks: rank 0 held two of them, rank 6 one
        assert st["recoveries"][1]["requests_requeued"] == 3
        validate(eng.placement, eng.alive)
        check_weights(eng)
        # the engine still scores like one device
        ids = np.random.RandomState(0).randint(0, 256, (3, 6))
        with jem.Engine.from_config("tiny", num_ranks=1, seed=0) as one:
            assert np.abs(eng.score(ids) - one.score(ids)).max() <= 1e-5


def test_precompiled_fallback_is_used(reference_tokens):
    with jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=4, seed=0,
                                precompile_fallbacks=True) as eng:
        eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])    # starts the background compiles
        assert eng.wait_fallbacks() == 4                                 # one mesh per rank that may fail
        eng.fail_rank(2, at_step=6)
        out = eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        assert [r.token_ids for r in out] == reference_tokens
        rec = eng.stats()["recoveries"][0]
        assert rec["precompiled"] and rec["compile_s"] < 0.05


def test_two_simultaneous_failures_use_programs_compiled_for_another_pair(reference_tokens):
    # one compile per mesh size: the 6-device programs were compiled for some other pair of dead
    # ranks and loaded onto these survivors' devices, in the background or at the failure
    with jem.Engine.from_config("tiny", num_ranks=8, redundant_experts=8, seed=0,
                                precompile_fallbacks=True) as eng:
        eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        assert eng.wait_fallbacks() == 8 + 28                            # every 1- and 2-failure survivor set
        assert sorted(eng._runtime.fallbacks.portable) == [6, 7]
        eng.fail_rank(1, at_step=5)
        eng.fail_rank(4, at_step=5)
        out = eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        assert [r.token_ids for r in out] == reference_tokens
        rec = eng.stats()["recoveries"][0]
        assert rec["failed_ranks"] == [1, 4] and rec["precompiled"] and rec["compile_s"] < 0.05
        validate(eng.placement, eng.alive)
        check_weights(eng)
        # programs kept: those of survivor sets inside the new mesh; the others are freed while idle
        assert all(k <= set(eng.stats()["alive_ranks"]) for k in eng._runtime.fallbacks.loaded)
        deadline = time.monotonic() + 20
        while eng._runtime.fallbacks.stale and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not eng._runtime.fallbacks.stale


def test_portable_program_matches_one_compiled_for_its_devices():
    from jax_elastic_moe.runtime.controller import compact
    from jax_elastic_moe.runtime.spmd import Portable, SpmdRunner
    from jax_elastic_moe.runtime.step import ROW_INPUTS, StepShape
    with jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=4, seed=0, max_model_len=32) as eng:
        eng.generate(PROMPTS[:4], max_new_tokens=3, stop_token_ids=[])       # every survivor holds a cache
        run = eng._runtime.runner
        _, p = eng._controller.decide([3], eng.expert_loads(), eng.placement)
        p = compact(p, np.array([1, 1, 1, 0], bool))
        devs = run.devices
        a = SpmdRunner(run.cfg, run.dtype, devs[:3], p, None, run.backend)
        b, _ = run.survivors([0, 2, 3], p, eng._backup)      # the mesh the program is moved onto
        shape = StepShape("decode", eng.seqs_per_rank, 1, eng.seqs_per_rank, 32)
        moved = Portable(a.step_fn(shape), a.devices).load(b.devices)
        native = b.step_fn(shape)
        n = 3 * shape.rows
        rows = {name: np.ones((n, 1) if chunked else (n,), np.dtype(dtype)) for name, (dtype, chunked) in ROW_INPUTS.items()}
        rows["tokens"][:] = np.arange(n)[:, None] % 200
        rows["positions"][:] = 5
        rows["slot"][:] = np.tile(np.arange(shape.rows), 3)
        rows["last"][:] = 0
        args = [b.put_batch(v) for v in rows.values()] + [b.log2phy, b.active, np.int32(0)]
        copy = jax.tree.map(lambda x: x.copy(), b.cache)
        got, want = moved(b.params, copy, *args), native(b.params, b.cache, *args)
        assert {s.device for s in got[0].addressable_shards} == set(b.devices)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.array_equal(np.asarray(g), np.asarray(w))
        with pytest.raises(ValueError, match="compiled for 3 devices"):
            Portable(a.step_fn(shape), a.devices).load(devs)


def test_portable_program_runs_when_the_persistent_cache_holds_it(compilation_cache):
    # XLA:CPU cannot serialize a program it read from the persistent cache again (the copy fails at
    # its first run): programs for Portable are compiled fresh, whatever the cache holds
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax_elastic_moe.jax_compat import Portable, fresh_compile
    from jax_elastic_moe.jax_compat import enable_compilation_cache
    enable_compilation_cache(compilation_cache)
    devs, x = jax.devices(), np.arange(32, dtype=np.float32).reshape(4, 8)

    def program(devices):
        sh = NamedSharding(Mesh(np.array(devices), ("x",)), P("x"))
        f = jax.jit(lambda a: jax.numpy.pad(a * 2, ((0, 0), (1, 1))).cumsum(axis=1), in_shardings=sh, out_shardings=sh)
        return f, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    f, spec = program(devs[:2])
    want = np.asarray(f.lower(spec).compile()(jax.device_put(x, spec.sharding)))    # the cache now holds it
    assert os.listdir(compilation_cache)
    f, spec = program(devs[:2])
    with fresh_compile():
        moved = Portable(f.lower(spec).compile(), devs[:2]).load(devs[2:4])
    _, onto = program(devs[2:4])
    assert np.array_equal(np.asarray(moved(jax.device_put(x, onto.sharding))), want)


def test_too_few_survivors_stop_the_engine_clearly():
    with jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=0, seed=0) as eng:
        eng.fail_rank(1, at_step=1)
        with pytest.raises(EngineDead, match="too few|cannot serve"):
            eng.generate(PROMPTS[:2], max_new_tokens=4, stop_token_ids=[])
        with pytest.raises(EngineDead):
            eng.generate(PROMPTS[:2], max_new_tokens=4)


def test_fail_rank_rejects_bad_requests():
    with jem.Engine.from_config("tiny", num_ranks=2, redundant_experts=0, seed=0) as eng:
        with pytest.raises(ValueError, match="not a live rank"):
            eng.fail_rank(5)
        with pytest.raises(ValueError, match="mooncake"):
            eng.fail_rank(0, how="hang")
