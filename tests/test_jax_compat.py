"""The private JAX APIs behind jax_compat.py: a compiled SPMD program moved onto other devices must
still run and give the same results, and the pickle of a serialized executable must use exactly the
persistent ids jax_compat knows. A JAX release that changes either fails here, by name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_elastic_moe import jax_compat


def _compiled(devices):
    mesh = Mesh(np.array(devices), ("ep",))
    sharding = NamedSharding(mesh, P("ep"))

    def step(x):
        return jax.lax.psum(jnp.sin(x) * 2.0, "ep") + x

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    x = jax.device_put(jnp.arange(8.0).reshape(4, 2), sharding)
    return fn.lower(x).compile(), x, sharding


def test_version_is_one_the_private_apis_were_checked_on():
    assert jax.__version__ in jax_compat.CHECKED_JAX, (
        f"jax {jax.__version__}: check Portable's private APIs (this file's other tests) and add the "
        "version to jax_compat.CHECKED_JAX")


def test_portable_moves_a_program_onto_other_devices_with_the_known_format():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 (fake CPU) devices")
    compiled, x, _ = _compiled(devices[:2])
    want = np.asarray(compiled(x))
    portable = jax_compat.Portable(compiled, devices[:2])
    target = [devices[3], devices[2]]
    moved = portable.load(target)
    assert set(jax_compat.REMAPPED_IDS) <= portable.seen <= set(jax_compat.PERSISTENT_IDS), (
        f"jax {jax.__version__} changed the persistent ids of a serialized executable: saw {portable.seen}, "
        f"jax_compat knows {jax_compat.PERSISTENT_IDS} and remaps {jax_compat.REMAPPED_IDS}")
    x_moved = jax.device_put(np.asarray(x), NamedSharding(Mesh(np.array(target), ("ep",)), P("ep")))
    got = moved(x_moved)
    assert {d.id for d in got.sharding.device_set} == {d.id for d in target}
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    with pytest.raises(ValueError, match="compiled for 2 devices"):
        portable.load(devices[:3])


def test_check_portable_passes_here():
    jax_compat.check_portable()
