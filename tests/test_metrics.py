"""Prometheus metrics of an engine, read over HTTP on loopback."""
import urllib.request

import pytest

import jax_elastic_moe as jem
from jax_elastic_moe.runtime.controller import EngineDead

parser = pytest.importorskip("prometheus_client.parser", reason="metrics need prometheus-client")


def scrape(port: int) -> dict:
    """{(sample name, sorted label items): value} of the engine's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def state(samples) -> str:
    (name,) = [labels[0][1] for (metric, labels), v in samples.items() if metric == "jem_elastic_state" and v == 1]
    return name


def test_metrics_follow_generation_recovery_and_death():
    eng = jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=4, seed=0, metrics_port=0)
    other = jem.Engine.from_config("tiny", num_ranks=2, seed=0, metrics_port=0)     # its own registry
    try:
        assert eng.metrics_port > 0 and other.metrics_port not in (0, eng.metrics_port)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        eng.generate(prompts, max_new_tokens=5, stop_token_ids=[])
        m = scrape(eng.metrics_port)
        assert state(m) == "healthy" and m[("jem_active_ranks", ())] == 4
        assert m[("jem_tokens_generated_total", ())] == 15
        assert m[("jem_step_latency_seconds_count", ())] == 5 and m[("jem_step_latency_seconds_sum", ())] > 0
        assert m[("jem_recoveries_total", ())] == 0
        assert scrape(other.metrics_port)[("jem_tokens_generated_total", ())] == 0

        eng.fail_rank(1, at_step=2)
        eng.generate(prompts, max_new_tokens=5, stop_token_ids=[])
        m = scrape(eng.metrics_port)
        assert state(m) == "degraded" and m[("jem_active_ranks", ())] == 3
        assert m[("jem_recoveries_total", ())] == 1
        assert m[("jem_last_interruption_seconds", ())] == pytest.approx(eng.stats()["recoveries"][0]["total_s"])
        # 5 steps again: the dead rank's request is prefilled again on a survivor in the same step as
        # the others' decode (a failed step is not counted)
        assert m[("jem_tokens_generated_total", ())] == 30 and m[("jem_step_latency_seconds_count", ())] == 10

        eng.fail_rank(2)
        eng.fail_rank(3)
        with pytest.raises(EngineDead):
            eng.generate(prompts, max_new_tokens=2)
        assert state(scrape(eng.metrics_port)) == "dead"
    finally:
        eng.close()
        other.close()
    with pytest.raises(OSError):                  # the server stopped with the engine
        scrape(eng.metrics_port)
    assert jem.Engine.from_config("tiny", num_ranks=2, seed=0).metrics is None
