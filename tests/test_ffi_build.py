"""The native kernels load where they were built: a kernel module that is in the package but does not
load, or (JEM_REQUIRE_FFI, set by CI) one that was not built, is a failure here, never a skip.

JEM_REQUIRE_FFI: platforms whose kernels must be there, comma-separated ("cpu", "cpu,CUDA"); "1"
means "cpu"."""
import importlib.util

import pytest

from jax_elastic_moe.ep import ffi
from runtime_support import ffi_required

MODULES = {"cpu": "_ffi_cpu", "CUDA": "_ffi_cuda"}


def _built(module: str) -> list[str]:
    """The file of the package's native `module` where the install has one (editable or not)."""
    spec = importlib.util.find_spec(f"jax_elastic_moe.{module}")
    return [] if spec is None or not spec.origin else [spec.origin]


@pytest.mark.parametrize("platform", ["cpu", "CUDA"])
def test_built_kernels_load(platform):
    built = _built(MODULES[platform])
    if not built and not ffi_required(platform):
        pytest.skip(f"{MODULES[platform]} is not built here (set JEM_REQUIRE_FFI={platform} to require it)")
    assert ffi.available(platform), (f"{built or MODULES[platform] + ' (not built)'}: "
                                     f"{ffi.missing_reason(platform)}")


def test_cpu_grouped_matmul_kernels_are_registered():
    if not ffi.available("cpu") and not ffi_required("cpu"):
        pytest.skip(ffi.missing_reason("cpu"))
    assert ffi.has_target("jem_grouped_matmul", "cpu") and ffi.has_target("jem_grouped_matmul_fp8", "cpu")


def test_native_exchange_module_loads():
    pytest.importorskip("mooncake.engine", reason="needs the elastic extras")
    built = _built("_exchange_cpu")
    if not built and not ffi_required("cpu"):
        pytest.skip("_exchange_cpu is not built here")
    from jax_elastic_moe.runtime import exchange_ffi
    exchange_ffi.load()             # raises ExchangeUnavailable saying why
