import os

# Fake CPU devices for the expert-parallel tests; must happen before JAX starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{family: checkpoint dir} of tiny random Hugging Face models (built once per session)."""
    pytest.importorskip("transformers")
    from hf_models import FAMILIES, build
    root = tmp_path_factory.mktemp("hf")
    return {f: build(f, str(root / f)) for f in FAMILIES}


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent JAX compilation cache in a fresh folder for one test, switched off after it: the
    cache is process-wide, and later tests must not read this one's programs."""
    from jax._src import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    yield str(tmp_path / "xla")
    for n, v in before.items():
        jax.config.update(n, v)
    cc.reset_cache()

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (item.rep_setup / rep_call / rep_teardown), so a
    fixture can tell whether its test failed (tests/test_mooncake.py replaces a failed test's engine)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
