"""The named choices (kinds.py): strings and members are interchangeable, one backend vocabulary,
bad values named with the choices."""
import pytest

from jax_elastic_moe import Backend, FailureKind, Mode
from jax_elastic_moe.ep import grouped_matmul, ops
from jax_elastic_moe.kinds import EP_BACKENDS


def test_strings_and_members_are_interchangeable():
    assert Mode.parse("spmd") is Mode.SPMD and Mode.SPMD == "spmd"
    assert f"{Mode.MOONCAKE}" == "mooncake" and str(FailureKind.KILL) == "kill"
    assert Backend.parse(Backend.FFI, "backend", EP_BACKENDS) is Backend.FFI


def test_one_backend_vocabulary_for_the_ep_ops_and_the_grouped_matmul():
    assert set(ops.BACKENDS) <= set(Backend) and set(grouped_matmul.IMPLS) == set(Backend)
    assert ops.resolve_backend("jax") is Backend.JAX
    assert grouped_matmul.impl_for_backend("ffi") is Backend.AUTO


def test_bad_values_name_the_choices():
    with pytest.raises(ValueError, match="mode must be one of 'spmd', 'mooncake', got 'nccl'"):
        Mode.parse("nccl", "mode")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'jax', 'ffi', got 'mgpu'"):
        ops.resolve_backend("mgpu")
    with pytest.raises(ValueError, match="how must be one of 'kill', got 'hang'"):
        FailureKind.parse("hang", "how", [FailureKind.KILL])
