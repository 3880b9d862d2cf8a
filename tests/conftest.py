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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (item.rep_setup / rep_call / rep_teardown), so a
    fixture can tell whether its test failed (tests/test_mooncake.py replaces a failed test's engine)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
