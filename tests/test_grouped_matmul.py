"""grouped_matmul / expert_mlp: the ragged_dot path against the reference, and the per-shape choice of
Mosaic GPU tile configs with its fallback (the compile probe is replaced where no GPU is present)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_elastic_moe.ep import ffi
from jax_elastic_moe.ep import grouped_matmul as gm
from jax_elastic_moe.ep import reference
from runtime_support import ffi_required


def make_experts(seed, m, h, i, groups, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(m - 2, np.ones(groups) / groups).astype(np.int32)  # 2 padding rows at the end
    x = jnp.asarray(rng.standard_normal((m, h)), dtype)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((groups, h, i)) / np.sqrt(h), dtype) for _ in range(2))
    w_down = jnp.asarray(rng.standard_normal((groups, i, h)) / np.sqrt(i), dtype)
    return x, jnp.asarray(sizes), w_gate, w_up, w_down


def test_ragged_dot_path_equals_reference():
    x, sizes, w_gate, w_up, w_down = make_experts(0, 24, 16, 8, 3)
    np.testing.assert_array_equal(np.asarray(gm.grouped_matmul(x, w_gate, sizes, impl="jax")),
                                  np.asarray(jax.lax.ragged_dot(x, w_gate, sizes)))
    got = gm.expert_mlp(x, sizes, w_gate, w_up, w_down, impl="jax")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reference.expert_mlp(x, sizes, w_gate, w_up, w_down)))
    assert not np.asarray(got[-2:]).any()  # rows past sum(group_sizes) are zero


needs_cpu_kernel = pytest.mark.skipif(not ffi.has_target("jem_grouped_matmul", "cpu") and not ffi_required("cpu"),
                                      reason=ffi.missing_reason("cpu") or "jem_grouped_matmul not built")


def dense_reference(x, w, sizes):
    """Row by row in float64: row r of group g times w[g]; rows past the groups are zero."""
    x, w, sizes = (np.asarray(a, np.float64) for a in (x, w, sizes))
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, n in enumerate(sizes.astype(int)):
        n = min(max(n, 0), x.shape[0] - start)
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


@needs_cpu_kernel
@pytest.mark.parametrize("m,k,n,groups", [(24, 16, 8, 3), (37, 64, 300, 5), (5, 7, 3, 1), (64, 256, 128, 9),
                                          (16, 8, 520, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_cpu_kernel_matches_ragged_dot(m, k, n, groups, dtype):
    rng = np.random.default_rng(m * 7 + groups)
    sizes = rng.multinomial(m - 2, np.ones(groups + 1) / (groups + 1))[:groups].astype(np.int32)
    sizes[groups // 2] = 0                                 # an empty group (an idle redundant slot)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((groups, k, n)) / np.sqrt(k), dtype)
    got = jax.jit(lambda a, b, c: gm.grouped_matmul(a, b, c, impl="ffi"))(x, w, jnp.asarray(sizes))
    assert got.dtype == x.dtype and got.shape == (m, n)
    want = dense_reference(x, w, sizes)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(jax.lax.ragged_dot(x, w, jnp.asarray(sizes)),
                                                                      np.float32), rtol=tol, atol=tol)
    assert not np.asarray(got[int(sizes.sum()):], np.float32).any()   # rows past the groups are zero


@needs_cpu_kernel
def test_cpu_kernel_clips_bad_group_sizes():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
    for sizes in ([-3, 4, 2], [6, 9, 9], [0, 0, 0]):          # negative counts as 0; past M is clipped
        got = gm.grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), impl="ffi")
        np.testing.assert_allclose(np.asarray(got), dense_reference(x, w, np.asarray(sizes)), rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_expert_mlp_on_the_cpu_kernel_matches_reference():
    x, sizes, w_gate, w_up, w_down = make_experts(5, 40, 32, 16, 4)
    assert gm._use_cpu_kernel("auto", x, w_gate)            # the default on the CPU
    got = gm.expert_mlp(x, sizes, w_gate, w_up, w_down)
    want = reference.expert_mlp(x, sizes, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="must match"):
        gm.grouped_matmul(x, w_gate.astype(jnp.bfloat16), sizes, impl="ffi")


def fp8_weights(rng, groups, k, n, block):
    """Random FP8 weights [G, K, N] and float32 block scales [G, ceil(K/bk), ceil(N/bn)], and their
    float64 dequantization computed here (decoded FP8 values times the block's scale)."""
    import ml_dtypes
    w = (rng.standard_normal((groups, k, n)) * 40).astype(ml_dtypes.float8_e4m3fn)
    scale = np.exp(rng.standard_normal((groups, -(-k // block[0]), -(-n // block[1])))).astype(np.float32)
    full = np.repeat(np.repeat(scale.astype(np.float64), block[0], axis=1), block[1], axis=2)[:, :k, :n]
    return w, scale, w.astype(np.float64) * full


@pytest.mark.parametrize("impl", ["ffi", "jax"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_grouped_matmul_matches_a_float64_reference(impl, dtype):
    if impl == "ffi" and not ffi.has_target("jem_grouped_matmul_fp8", "cpu") and not ffi_required("cpu"):
        pytest.skip(ffi.missing_reason("cpu") or "jem_grouped_matmul_fp8 not built")
    rng = np.random.default_rng(7)
    block = (16, 8)                                    # K = 40 and N = 21: partial blocks and panels
    w, scale, w64 = fp8_weights(rng, 4, 40, 21, block)
    sizes = np.array([5, 0, 9, 3], np.int32)           # an empty group, 3 padding rows at the end
    x = jnp.asarray(rng.standard_normal((20, 40)), dtype)
    got = gm.grouped_matmul_fp8(x, jnp.asarray(w), jnp.asarray(scale), jnp.asarray(sizes), block, impl=impl)
    assert got.dtype == dtype
    want = dense_reference(np.asarray(x, np.float64), w64, sizes)
    tol = 1e-4 * np.abs(want).max() if dtype == jnp.float32 else 2e-2 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol)
    assert not np.asarray(got[int(sizes.sum()):], np.float32).any()
    if impl == "ffi":
        with pytest.raises(Exception, match="scale has shape"):
            gm.grouped_matmul_fp8(x, jnp.asarray(w), jnp.asarray(scale[:, :1]), jnp.asarray(sizes), block, impl="ffi")


def test_fp8_e4m3_decoding_covers_every_byte():
    """The kernel's FP8 table against ml_dtypes on all 256 codes (as one-element weights, scale 1)."""
    import ml_dtypes
    if not ffi.has_target("jem_grouped_matmul_fp8", "cpu") and not ffi_required("cpu"):
        pytest.skip("jem_grouped_matmul_fp8 not built")
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).reshape(256, 1, 1)
    x = jnp.ones((256, 1), jnp.float32)
    got = gm.grouped_matmul_fp8(x, jnp.asarray(codes), jnp.ones((256, 1, 1), jnp.float32),
                                jnp.ones(256, jnp.int32), (1, 1), impl="ffi")
    np.testing.assert_array_equal(np.asarray(got)[:, 0], codes.astype(np.float32).reshape(-1))


def test_fused_gate_up_equals_separate():
    x, sizes, w_gate, w_up, w_down = make_experts(1, 20, 8, 4, 2)
    fused = gm.expert_mlp(x, sizes, jnp.concatenate([w_gate, w_up], axis=-1), None, w_down)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(gm.expert_mlp(x, sizes, w_gate, w_up, w_down)),
                               rtol=1e-6, atol=1e-6)


def test_first_working_config_skips_misfits_and_failures():
    tried = []

    def probe(config, m, k, n, groups, dtype):
        tried.append(config)
        if config["max_concurrent_steps"] == 5:
            raise ValueError("Mosaic GPU kernel exceeds available shared memory")

    # n = 256: configs needing block_n * grid_block_n = 512 do not divide it and are never probed
    got = gm.first_working_config(gm.MGPU_CONFIGS, 4096, 7168, 256, 16, jnp.bfloat16, probe)
    assert got == gm.MGPU_CONFIGS[2]
    assert tried == [gm.MGPU_CONFIGS[2]]
    got = gm.first_working_config(gm.MGPU_CONFIGS, 4096, 7168, 4096, 16, jnp.bfloat16, probe)
    assert got == gm.MGPU_CONFIGS[1]
    reasons = gm.rejected[(4096, 7168, 4096, 16, "bfloat16")]
    assert "shared memory" in reasons[0][1]

    def never(*args):
        raise ValueError("no")

    assert gm.first_working_config(gm.MGPU_CONFIGS, 64, 64, 64, 2, jnp.bfloat16, never) is None
    assert gm.first_working_config(gm.MGPU_CONFIGS, 64, 100, 64, 2, jnp.bfloat16, probe) is None  # k % 64


@pytest.mark.skipif(gm.is_hopper(), reason="the Mosaic GPU kernel compiles on Hopper")
def test_mgpu_unavailable_falls_back_to_ragged_dot(caplog):
    """Off Hopper the Mosaic kernel cannot compile: every config is rejected and ragged_dot is used."""
    x, sizes, w_gate, _, _ = make_experts(2, 16, 64, 128, 2, jnp.bfloat16)
    with caplog.at_level("WARNING"):
        got = gm.grouped_matmul(x, w_gate, sizes, impl="mgpu")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.ragged_dot(x, w_gate, sizes)))
    assert "no ragged_dot_mgpu tile config works" in caplog.text
    assert gm.choose_config(16, 64, 128, 2, "bfloat16") is None


def test_bad_shapes_and_impls():
    x, sizes, w_gate, _, _ = make_experts(3, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="shapes do not fit"):
        gm.grouped_matmul(x[:, :3], w_gate, sizes)
    with pytest.raises(ValueError, match="impl must be one of"):
        gm.grouped_matmul(x, w_gate, sizes, impl="triton")
    with pytest.raises(ValueError, match="ragged_dot_mgpu needs equal bfloat16"):
        gm.grouped_matmul(x, w_gate, sizes, impl="mgpu")


@pytest.mark.skipif(not gm.is_hopper(), reason="needs a Hopper GPU")
def test_mgpu_matches_ragged_dot_on_hopper():
    x, sizes, w_gate, w_up, w_down = make_experts(4, 1024, 512, 256, 4, jnp.bfloat16)
    assert gm.choose_config(1024, 512, 256, 4, "bfloat16") is not None
    got = gm.grouped_matmul(x, w_gate, sizes, impl="mgpu")
    want = jax.lax.ragged_dot(x, w_gate, sizes)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    assert not np.asarray(got[-2:], np.float32).any()
    mlp = gm.expert_mlp(x, sizes, w_gate, w_up, w_down)
    ref = reference.expert_mlp(x, sizes, w_gate, w_up, w_down)
    err = np.linalg.norm(np.asarray(mlp, np.float32) - np.asarray(ref, np.float32)) / np.linalg.norm(np.asarray(ref, np.float32))
    assert err < 2e-2
