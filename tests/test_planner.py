"""Availability planner (`jem plan`): config reading, loss probabilities, sequential failures, CLI."""
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from jax_elastic_moe.placement import Placement, PlacementError, rebalance
from jax_elastic_moe.bench import plan as plan_cli
from jax_elastic_moe.placement import planner

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def brute_force_loss(placement: Placement, k: int) -> float:
    """P(some (layer, expert) has every replica among k random failed ranks), by enumeration."""
    held = [[set(placement.slot_rank()[placement.phy2log[layer] == e].tolist())
             for e in range(placement.num_logical)] for layer in range(placement.num_layers)]
    subsets = list(itertools.combinations(range(placement.num_ranks), k))
    losing = sum(any(ranks <= set(failed) for layer in held for ranks in layer) for failed in subsets)
    return losing / len(subsets)


@pytest.fixture(scope="module")
def small_placement():
    loads = planner.zipf_loads(3, 10, 1.2, seed=1)
    return rebalance(loads, 7, 3, "deepseek_global")           # 21 slots, 11 redundant


def test_deepseek_v3_preset_reads_as_256_experts_on_58_moe_layers():
    shape = planner.read_model_shape(str(CONFIGS / "deepseek_v3.yaml"))
    assert (shape.num_logical, shape.num_moe_layers, shape.num_groups) == (256, 58, 8)
    assert shape.expert_bytes(2) == 3 * 7168 * 2048 * 2
    config = yaml.safe_load((CONFIGS / "deepseek_v3.yaml").read_text())
    assert config["rope_scaling"]["type"] == "yarn" and config["num_experts_per_tok"] == 8


@pytest.mark.parametrize("config, expected", [
    (dict(num_experts=128, num_hidden_layers=48, decoder_sparse_step=1, mlp_only_layers=[],
          moe_intermediate_size=768, hidden_size=2048), (128, 48, 768)),                    # Qwen3-MoE
    (dict(num_experts=60, num_hidden_layers=24, decoder_sparse_step=2, mlp_only_layers=[1],
          moe_intermediate_size=1408, hidden_size=2048), (60, 11, 1408)),                   # sparse step
    (dict(num_local_experts=8, num_hidden_layers=32, intermediate_size=14336, hidden_size=4096),
     (8, 32, 14336)),                                                                       # Mixtral
])
def test_model_shape_reads_each_family_config(config, expected):
    shape = planner.model_shape(config)
    assert (shape.num_logical, shape.num_moe_layers, shape.expert_intermediate_size) == expected


def test_model_shape_names_a_missing_key():
    with pytest.raises(PlacementError, match="n_routed_experts"):
        planner.model_shape(dict(num_hidden_layers=4, hidden_size=8))


def test_exact_loss_probability_matches_enumeration(small_placement):
    rank_sets = planner.minimal_rank_sets(small_placement)
    for k in range(1, 8):
        row = planner.loss_probability(rank_sets, 7, k)
        assert row["method"] == "exact"
        assert row["probability"] == pytest.approx(brute_force_loss(small_placement, k), abs=1e-12)


def test_monte_carlo_loss_probability_brackets_the_exact_value():
    # two replicas of each of 6 experts on 6 ranks: loss needs both ranks of some pair
    placed = Placement.from_phy2log([[0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 0]], 6, 6)
    rank_sets = planner.minimal_rank_sets(placed)
    exact = brute_force_loss(placed, 3)
    sampled = planner.loss_probability(rank_sets, 6, 3, exact_limit=0, samples=4000,
                                       rng=np.random.default_rng(3))
    assert sampled["method"] == "monte_carlo" and sampled["samples"] == 4000
    assert sampled["low"] <= exact <= sampled["high"] and sampled["high"] - sampled["low"] < 0.05
    assert planner.min_failures_to_lose(placed) == 2
    assert planner.loss_probability(rank_sets, 6, 1)["probability"] == 0.0


def test_simultaneous_failures_is_monotone_and_ends_certain(small_placement):
    rows = planner.simultaneous_failures(small_placement, 7)
    probabilities = [row["probability"] for row in rows]
    assert probabilities == sorted(probabilities) and probabilities[-1] == 1.0


def test_wilson_interval_contains_the_estimate_and_narrows():
    low, high = planner.wilson_interval(30, 100)
    assert low < 0.3 < high
    low2, high2 = planner.wilson_interval(300, 1000)
    assert high2 - low2 < high - low


@pytest.mark.parametrize("policy", ["deepseek_global", "round_robin"])
def test_sequential_failures_are_served_while_survivors_hold_every_expert(policy):
    loads = planner.zipf_loads(2, 10, 1.2, seed=0)
    result = planner.sequential_failures(loads, 6, 3, policy, expert_bytes=100)
    assert result["largest_k_served"] == result["capacity_bound"] == 6 - math.ceil(10 / 3)
    assert "too few for 10 logical experts" in result["stop_reason"]
    for step in result["steps"]:
        assert step["alive_slots"] == (6 - step["k"]) * 3 and step["moved_bytes"] == 100 * step["moved"]
        assert step["moved"] >= step["restored"] >= 0


def write_config(path: Path, **keys) -> str:
    config = dict(model_type="tiny_moe", n_routed_experts=12, num_hidden_layers=3, first_k_dense_replace=1,
                  hidden_size=64, moe_intermediate_size=32, n_group=4)
    config.update(keys)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_jem_plan_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    code = plan_cli.main(["--config", config, "--ranks", "6", "--redundant", "12", "--json",
                         str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "largest k served = 3" in printed and "deepseek_global" in printed
    report = json.loads((tmp_path / "plan.json").read_text())
    assert {"simultaneous", "sequential", "imbalance", "slots_per_rank", "expert_bytes"} <= set(report)
    assert (report["slots_per_rank"], report["num_moe_layers"], report["groups"]) == (4, 2, 4)
    assert report["expert_bytes"] == 3 * 64 * 32 * 2
    assert report["sequential"]["largest_k_served"] == 3 == 6 - math.ceil(12 / 4)
    for load in report["loads"]:
        rows = report["simultaneous"][load]["rows"]
        assert [row["k"] for row in rows] == list(range(1, 7)) and rows[-1]["probability"] == 1.0
    assert set(report["imbalance"]) >= {"round_robin", "deepseek_global", "deepseek_hierarchical"}
    zipf = report["loads"][1]
    assert report["imbalance"]["deepseek_global"][zipf]["mean"] <= report["imbalance"]["round_robin"][zipf]["mean"]
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jem_plan_for_deepseek_v3_serves_sixteen_sequential_failures(tmp_path):
    code = plan_cli.main(["--config", str(CONFIGS / "deepseek_v3.yaml"), "--ranks", "32", "--redundant", "256",
                         "--layers", "2", "--samples", "2000", "--json", str(tmp_path / "v3.json")])
    assert code == 0
    report = json.loads((tmp_path / "v3.json").read_text())
    assert report["slots_per_rank"] == 16 and report["sequential"]["largest_k_served"] == 16
    uniform = report["simultaneous"]["uniform"]
    # every expert has two replicas on two ranks: one failure never loses one, some pair does
    assert uniform["min_failures_to_lose"] == 2 and uniform["rows"][0]["probability"] == 0.0
    assert 0 < uniform["rows"][1]["probability"] < 1
    assert report["imbalance"]["deepseek_global"]["zipf(1.2)"]["max"] <= 1.01


@pytest.mark.parametrize("args, message", [
    (["--ranks", "5", "--redundant", "0"], "12 experts + 0 redundant = 12 slots do not divide over 5 ranks"),
    (["--ranks", "6", "--redundant", "6", "--nodes", "4"], "--nodes 4 must divide --ranks 6"),
    (["--ranks", "6", "--redundant", "6", "--policy", "nope"], "unknown placement policy 'nope'"),
])
def test_jem_plan_reports_bad_input(tmp_path, capsys, args, message):
    config = write_config(tmp_path / "tiny.yaml")
    assert plan_cli.main(["--config", config, *args]) == 2
    assert message in capsys.readouterr().err


def test_jem_plan_reports_a_missing_config(capsys):
    assert plan_cli.main(["--config", "no/such.yaml", "--ranks", "2"]) == 2
    assert "no/such.yaml" in capsys.readouterr().err
