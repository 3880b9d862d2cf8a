"""The FFI ops (ep/ffi.py, csrc/) against the pure-JAX reference (ep/reference.py), through ep/ops.py.

Permutations (dispatch, regroup) must match exactly; the float32 sums (ungroup, combine) within 1e-6
relative, bfloat16 within its rounding."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_elastic_moe.ep import ffi, ops, reference
from runtime_support import ffi_required

# The default platform's kernels: CPU here; CUDA on a GPU machine (JEM_FFI_CUDA_LIBRARY, gpu_check.py).
# With JEM_REQUIRE_FFI (CI) they run, and fail, when the kernels are missing.
needs_ffi = pytest.mark.skipif(not ffi.available() and not ffi_required(jax.default_backend()),
                               reason=ffi.missing_reason())
FUZZ = settings(max_examples=int(os.environ.get("JEM_FUZZ_EXAMPLES", "20")), deadline=None, derandomize=True)
# Shapes come from small sets so that compiled executables are reused across examples (fast tests);
# the contents (slots, -1 entries, duplicates, masks, values) are fuzzed freely.
TOKENS = st.sampled_from([0, 3, 16])
TOPK = st.sampled_from([1, 3])
RANKS = st.sampled_from([1, 3])
SLOTS = st.sampled_from([1, 2, 4])
HIDDEN = st.sampled_from([1, 8])


def make_slots(rng, t, k, n, s, p_none, distinct=True):
    """[T, K] int32 global slots in [0, N*S) or -1; distinct within a token unless told otherwise."""
    slots = np.full((t, k), -1, np.int32)
    for i in range(t):
        pick = rng.choice(n * s, size=k, replace=not distinct or k > n * s)
        slots[i] = np.where(rng.random(k) < p_none, -1, pick)
    return slots


def make_case(seed, t, k, n, s, h, dtype=jnp.float32, p_none=0.2, distinct=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, h)), dtype)
    slots = jnp.asarray(make_slots(rng, t, k, n, s, p_none, distinct))
    weights = jnp.asarray(rng.random((t, k)), dtype)
    return x, slots, weights


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype, v.dtype)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def assert_close(u, v, dtype):
    assert u.shape == v.shape and u.dtype == v.dtype
    tol = 1e-6 if jnp.dtype(dtype) == jnp.float32 else 2.0 ** -7
    np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=tol, atol=tol)


def both(fn, *args, **kw):
    return fn(*args, backend="jax", **kw), fn(*args, backend="ffi", **kw)


def run_path(x, slots, weights, n, s, active, backend):
    """One rank's full path without the exchange: dispatch, every destination's rows regrouped,
    a deterministic stand-in for the experts, ungroup, combine."""
    t = x.shape[0]
    send_x, send_slot, send_w, counts, src = ops.dispatch(x, slots, weights, n, s, active=active,
                                                          backend=backend)
    backs = []
    for d in range(n):
        grouped, sizes, entry_row, entry_w = ops.regroup(send_x[d], send_slot[d], send_w[d], s, backend=backend)
        slot_of_entry = jnp.repeat(jnp.arange(s), sizes, total_repeat_length=grouped.shape[0])
        entry_out = (grouped * (1.0 + slot_of_entry[:, None] + d * s)).astype(x.dtype)
        backs.append(ops.ungroup(entry_out, entry_row, entry_w, t, backend=backend))
    back = jnp.stack(backs)
    live = jnp.ones((n,), jnp.int32) if active is None else active
    return (ops.combine(back, src, live, t, backend=backend),
            ops.combine(back, src, live, t, renormalize=True, send_w=send_w, backend=backend), counts)


@needs_ffi
@FUZZ
@given(t=TOKENS, k=TOPK, n=RANKS, s=SLOTS, h=HIDDEN, p_none=st.sampled_from([0.0, 0.3, 1.0]), distinct=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_dispatch_and_regroup_match_reference(t, k, n, s, h, p_none, distinct, masked, seed):
    x, slots, weights = make_case(seed, t, k, n, s, h, p_none=p_none, distinct=distinct)
    active = jnp.asarray(np.random.default_rng(seed + 1).integers(0, 2, n), jnp.int32) if masked else None
    ref_out, ffi_out = both(ops.dispatch, x, slots, weights, n, s, active=active)
    assert_same(ref_out, ffi_out)
    send_x, send_slot, send_w = ref_out[:3]
    for d in range(n):
        assert_same(*both(ops.regroup, send_x[d], send_slot[d], send_w[d], s))
    # arbitrary local slots, duplicates and out-of-range values included: same truncation and padding
    rng = np.random.default_rng(seed + 2)
    row_slot = jnp.asarray(rng.integers(-2, s + 2, (t, k)), jnp.int32)
    assert_same(*both(ops.regroup, x, row_slot, weights, s))


@needs_ffi
@FUZZ
@given(t=TOKENS, k=TOPK, n=RANKS, s=SLOTS, h=HIDDEN, dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
def test_ungroup_and_combine_match_reference(t, k, n, s, h, dtype, seed):
    x, slots, weights = make_case(seed, t, k, n, s, h, dtype)
    active = jnp.asarray(np.random.default_rng(seed).integers(0, 2, n), jnp.int32)
    ref_plain, ref_norm, _ = run_path(x, slots, weights, n, s, None, "jax")
    ffi_plain, ffi_norm, _ = run_path(x, slots, weights, n, s, None, "ffi")
    assert_close(ref_plain, ffi_plain, dtype)
    assert_close(ref_norm, ffi_norm, dtype)
    # inactive ranks skipped by combine (rows were sent to every rank)
    send = ops.dispatch(x, slots, weights, n, s, backend="jax")
    back = jnp.asarray(np.random.default_rng(seed + 3).standard_normal((n, t, h)), dtype)
    for renorm in (False, True):
        ref_c, ffi_c = both(ops.combine, back, send[4], active, t, renormalize=renorm, send_w=send[2])
        assert_close(ref_c, ffi_c, dtype)


@needs_ffi
@pytest.mark.parametrize("case", ["T=0", "all -1", "single active rank", "K=1", "capacity full"])
def test_edge_cases(case):
    t, k, n, s, h = 16, 3, 4, 2, 8
    active = None
    x, slots, weights = make_case(7, t, k, n, s, h)
    if case == "T=0":
        x, slots, weights = x[:0], slots[:0], weights[:0]
    elif case == "all -1":
        slots = jnp.full_like(slots, -1)
    elif case == "single active rank":
        active = jnp.asarray([0, 0, 1, 0], jnp.int32)
    elif case == "K=1":
        x, slots, weights = make_case(8, t, 1, n, s, h, p_none=0.0)
    elif case == "capacity full":  # every token has an entry on every rank: counts == T everywhere
        slots = jnp.asarray(np.arange(n)[None, :] * s + np.arange(t)[:, None] % s, jnp.int32)
        weights = jnp.ones((t, n), jnp.float32)
    ref_out, ffi_out = both(ops.dispatch, x, slots, weights, n, s, active=active)
    assert_same(ref_out, ffi_out)
    counts = np.asarray(ffi_out[3])
    expect = {"T=0": [0] * n, "all -1": [0] * n, "capacity full": [t] * n}.get(case)
    if expect is not None:
        assert counts.tolist() == expect
    if case == "single active rank":
        assert counts[[0, 1, 3]].tolist() == [0, 0, 0] and counts[2] > 0
    for a, b in zip(run_path(x, slots, weights, n, s, active, "jax"), run_path(x, slots, weights, n, s, active, "ffi")):
        assert_close(a, b, jnp.float32) if a.dtype != jnp.int32 else assert_same([a], [b])


@needs_ffi
def test_path_matches_dense_moe():
    """dispatch -> regroup -> expert -> ungroup -> combine equals the dense weighted sum over top-k."""
    t, k, n, s, h = 12, 3, 3, 2, 4
    x, slots, weights = make_case(3, t, k, n, s, h, p_none=0.0)
    plain, _, _ = run_path(x, slots, weights, n, s, None, "ffi")
    scale = 1.0 + np.asarray(slots, np.float32)  # the stand-in expert multiplies by 1 + global slot
    dense = np.einsum("tk,tk,th->th", np.asarray(weights), scale, np.asarray(x))
    np.testing.assert_allclose(np.asarray(plain), dense, rtol=1e-5, atol=1e-6)


@needs_ffi
def test_ops_under_jit():
    t, k, n, s, h = 10, 2, 2, 3, 5
    x, slots, weights = make_case(4, t, k, n, s, h)
    fn = jax.jit(lambda a, b, c: ops.dispatch(a, b, c, n, s, backend="ffi"))
    assert_same(fn(x, slots, weights), ops.dispatch(x, slots, weights, n, s, backend="jax"))


def test_bad_input_is_a_clear_error():
    x, slots, weights = make_case(0, 4, 2, 2, 2, 3)
    with pytest.raises(ValueError, match="dispatch: weights has shape"):
        ops.dispatch(x, slots, weights[:, :1], 2, 2, backend="jax")
    with pytest.raises(TypeError, match="slots must be an integer array"):
        ops.dispatch(x, slots.astype(jnp.float32), weights, 2, 2, backend="jax")
    with pytest.raises(ValueError, match="active has shape"):
        ops.dispatch(x, slots, weights, 2, 2, active=jnp.ones(3, jnp.int32), backend="jax")
    with pytest.raises(ValueError, match="slots_per_rank must be a positive"):
        ops.regroup(x, slots, weights, 0, backend="jax")
    with pytest.raises(ValueError, match="renormalize=True needs send_w"):
        ops.combine(jnp.zeros((2, 4, 3)), jnp.zeros((2, 4), jnp.int32), jnp.ones(2, jnp.int32), 4, renormalize=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.ungroup(x, jnp.zeros(4, jnp.int32), jnp.zeros(4), 4, backend="cuda")


@needs_ffi
def test_native_errors_reach_python():
    """The handlers check shapes themselves; a wrong result shape comes back as an XLA error."""
    x, slots, weights = make_case(0, 4, 2, 2, 2, 3)
    bad = (jax.ShapeDtypeStruct((2, 5, 3), x.dtype),) + tuple(
        jax.ShapeDtypeStruct(sh, dt) for sh, dt in
        [((2, 4, 2), jnp.int32), ((2, 4, 2), x.dtype), ((2,), jnp.int32), ((2, 4), jnp.int32),
         ((ffi.dispatch_scratch(2, 4),), jnp.int32)])
    with pytest.raises(Exception, match="jem_dispatch: send_x has shape"):
        jax.block_until_ready(ffi._call("jem_dispatch", bad, x, slots, weights, jnp.ones(2, jnp.int32),
                                        slots_per_rank=np.int64(2)))
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        ops.ungroup(jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, jnp.int32), jnp.zeros(4), 4, backend="ffi")


def test_auto_falls_back_with_one_warning(monkeypatch):
    platform = ffi.xla_platform(jax.default_backend())
    monkeypatch.setattr(ffi, "_loaded", {})
    monkeypatch.setattr(ffi, "_missing", {platform: "module could not be loaded (test)"})
    monkeypatch.setattr(ops, "_warned", set())
    x, slots, weights = make_case(1, 6, 2, 2, 2, 3)
    with pytest.warns(RuntimeWarning, match="pip install"):
        got = ops.dispatch(x, slots, weights, 2, 2)
    assert_same(got, reference.dispatch(x, slots, weights, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.dispatch(x, slots, weights, 2, 2)  # warned once only
    with pytest.raises(RuntimeError, match=f"FFI kernels unavailable on {platform}"):
        ops.dispatch(x, slots, weights, 2, 2, backend="ffi")


@needs_ffi
def test_auto_is_ffi_for_float_dtypes():
    assert ops.resolve_backend("auto") == "ffi"
    assert ops.resolve_backend("auto", dtypes=(jnp.int32,)) == "jax"
