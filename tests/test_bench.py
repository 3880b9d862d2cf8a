"""`jem bench` subcommands with tiny settings: the JSON fields a user relies on, and the plots."""
import json
import os

import pytest

from jax_elastic_moe import cli
from jax_elastic_moe.bench import external, overhead, recovery, throughput

pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--config", "tiny", "--prompt-len", "4", "--quiet"]


def outputs(tmp_path, name):
    return tmp_path / f"{name}.json", tmp_path / f"{name}.png"


def read(json_path, png_path):
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    report = json.loads(json_path.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["jax"]
    return report


def test_throughput_report(tmp_path):
    js, png = outputs(tmp_path, "throughput")
    assert throughput.main(TINY + ["--ranks", "2", "--redundant", "2", "--batch", "2", "--new-tokens", "4",
                                   "--repeats", "2", "--json", str(js), "--plot", str(png)]) == 0
    report = read(js, png)
    assert report["settings"]["config"] == "tiny" and report["settings"]["new_tokens"] == 4
    assert report["tokens_per_s"]["n"] == 2 and report["tokens_per_s"]["min"] > 0
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p99"]
    assert report["tpot_s"]["n"] == 2 * 2              # one per request, per run
    assert all(run["tokens"] == 2 * 4 for run in report["runs"])
    assert report["outputs_same_every_run"] is True


def test_throughput_mixed_workload_runs_both_admission_policies(tmp_path):
    js, png = outputs(tmp_path, "throughput_mixed")
    assert throughput.main(TINY + ["--ranks", "2", "--redundant", "2", "--batch", "4", "--workload", "mixed",
                                   "--num-requests", "6", "--repeats", "1", "--json", str(js), "--plot", str(png)]) == 0
    report = read(js, png)
    assert report["policies"] == ["continuous", "static"] and report["requests"]["num"] == 6
    assert 16 <= report["requests"]["prompt_len"]["min"] and report["requests"]["prompt_len"]["max"] <= 512
    assert report["same_tokens_both_policies"] is True
    for p in ("continuous", "static"):
        (r,) = report["by_policy"][p]["runs"]
        assert r["tokens"] == sum(throughput.mixed_workload(6, 256, 0)[1])
    assert report["continuous_over_static"] == pytest.approx(
        report["by_policy"]["continuous"]["tokens_per_s"]["mean"] / report["by_policy"]["static"]["tokens_per_s"]["mean"])


def test_overhead_report(tmp_path):
    js, png = outputs(tmp_path, "overhead")
    assert overhead.main(TINY + ["--ranks", "2", "--redundant", "2", "--batch", "2", "--new-tokens", "3",
                                 "--repeats", "2", "--json", str(js), "--plot", str(png)]) == 0
    report = read(js, png)
    assert report["slots_per_rank"] == {"plain": 4, "elastic": 5}
    assert report["ratio"] == pytest.approx(report["elastic_tokens_per_s"]["median"]
                                            / report["plain_tokens_per_s"]["median"])
    assert len(report["pair_ratios"]) == 2 and report["ratio_spread"]["min"] <= report["ratio_spread"]["max"]
    assert report["outputs_identical"] is True


def test_recovery_report(tmp_path, compilation_cache):
    js, png = outputs(tmp_path, "recovery")
    assert recovery.main(TINY + ["--mode", "spmd", "--ranks", "4", "--redundant", "4", "--fail", "1",
                                 "--batch", "8", "--new-tokens", "7", "--at-step", "4",
                                 "--no-precompile-fallbacks", "--compilation-cache-dir", compilation_cache,
                                 "--json", str(js), "--plot", str(png)]) == 0
    report = read(js, png)
    assert report["restart_s"] > 0 and os.listdir(compilation_cache)     # the cache was used
    (row,) = report["rows"]
    assert row["failed"] == 1 and row["recoveries"] == 1
    assert row["failed_ranks"][0] not in row["active_ranks_after"] and len(row["active_ranks_after"]) == 3
    assert row["requests_lost"] == 0 and row["outputs_identical"] is True
    assert row["interruption_s"] >= row["detect_s"] + row["decide_s"] + row["restore_s"] > 0
    assert row["interruption_over_restart"] == pytest.approx(row["interruption_s"] / report["restart_s"])
    assert row["throughput_before"] > 0 and row["throughput_after"] > 0
    assert row["expected_fraction"] == 0.75 and len(row["steps"]) >= 7
    # 2 slots per rank: the dead rank's 2 requests were prefilled again and waited for their next token
    assert row["requests_requeued"] == 2 and row["requeue_delay_s"]["n"] == 2 and row["requeue_delay_s"]["min"] > 0


def test_recovery_refuses_counts_the_survivors_cannot_serve(capsys):
    assert recovery.main(["--config", "tiny", "--ranks", "4", "--redundant", "4", "--fail", "1,2", "--quiet"]) == 2
    assert "--redundant >= 8" in capsys.readouterr().err


def test_failed_ranks_are_distinct_and_spare_rank_zero():
    for n in (2, 4, 8):
        for k in range(1, n):
            ranks = recovery.failed_ranks(n, k)
            assert len(ranks) == k and 0 not in ranks and max(ranks) < n


def test_kernels_missing_script_is_a_clear_error(tmp_path, capsys):
    assert external.kernels_main([], script=str(tmp_path / "kernels.py")) == 2
    assert "kernels.py is not in this checkout" in capsys.readouterr().err


def test_kernels_rows_reported_and_plotted(tmp_path):
    script = tmp_path / "kernels.py"
    script.write_text(
        "import argparse, json\n"
        "def main(argv=None):\n"
        "    ap = argparse.ArgumentParser(); ap.add_argument('--tokens', type=int, nargs='+')\n"
        "    ap.add_argument('--json'); a = ap.parse_args(argv)\n"
        "    rows = [dict(op=op, backend=b, T=t, H=8, ms=0.1 * t, gbps=1.0) for op in ('dispatch', 'combine')\n"
        "            for b in ('jax', 'ffi') for t in a.tokens]\n"
        "    json.dump(rows, open(a.json, 'w'))\n")
    js, png = outputs(tmp_path, "kernels")
    assert external.kernels_main(["--tokens", "4", "16", "--json", str(js), "--plot", str(png)],
                                 script=str(script)) == 0
    report = read(js, png)
    assert report["settings"]["arguments"] == ["--tokens", "4", "16"]
    assert {(r["op"], r["backend"], r["T"]) for r in report["rows"]} >= {("combine", "ffi", 16), ("dispatch", "jax", 4)}


def test_placement_runs_the_planner(tmp_path):
    js, png = outputs(tmp_path, "placement")
    assert cli.main(["bench", "placement", "--config", "tiny", "--ranks", "4", "--redundant", "4",
                     "--samples", "100", "--json", str(js), "--plot", str(png)]) == 0
    report = read(js, png)
    assert report["benchmark"] == "placement" and report["ranks"] == 4 and report["slots_per_rank"] == 3


def test_cli_bench_lists_and_rejects_subcommands(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert "jem bench recovery" in capsys.readouterr().out
    assert cli.main(["bench", "nonsense"]) == 2
