"""`jem bench kernels` and `jem bench placement`: benchmarks whose logic lives elsewhere (the EP kernel
benchmark benchmarks/kernels.py, the placement planner), run with the same --json / --plot options and
the machine recorded in the JSON."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

from . import common

KERNELS_SCRIPT = os.path.join(common.REPO_ROOT, "benchmarks", "kernels.py")


def _split_output_args(prog: str, argv):
    """(our --json/--plot/--quiet options, the arguments left for the wrapped benchmark)."""
    ap = argparse.ArgumentParser(prog=prog, add_help=False)
    common.add_output_args(ap)
    return ap.parse_known_args(argv)


def load_kernels_main(script: str = KERNELS_SCRIPT):
    """main(argv) of the kernel benchmark script; FileNotFoundError with what to do when it is absent."""
    if not os.path.exists(script):
        raise FileNotFoundError(
            f"the kernel benchmark {script} is not in this checkout: it comes with the EP FFI kernels "
            f"(branch `ffi`); merge that branch, or run the script from a checkout that has it")
    spec = importlib.util.spec_from_file_location("jem_benchmark_kernels", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise FileNotFoundError(f"{script} has no main(argv) to run")
    return module.main


def plot_kernels(rows: list[dict], path: str):
    """Milliseconds against tokens T, one line per (op, backend, H), one panel per op."""
    ops = sorted({r["op"] for r in rows})
    fig, axes = common.new_figure(1, len(ops), figsize=(4 * len(ops), 3.6), squeeze=False)
    for ax, op in zip(axes[0], ops):
        series = sorted({(r["backend"], r["H"]) for r in rows if r["op"] == op})
        for backend, h in series:
            pts = sorted((r["T"], r["ms"]) for r in rows if r["op"] == op and r["backend"] == backend and r["H"] == h)
            ax.plot([t for t, _ in pts], [ms for _, ms in pts], marker="o", label=f"{backend} H={h}")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms", title=op)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def kernels_main(argv=None, script: str = KERNELS_SCRIPT) -> int:
    """Runs benchmarks/kernels.py with the remaining arguments; its rows go into our JSON report."""
    ours, rest = _split_output_args("jem bench kernels", argv)
    try:
        bench_main = load_kernels_main(script)
    except FileNotFoundError as e:
        print(f"jem bench kernels: error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        try:
            bench_main(rest + ["--json", rows_path])
        except SystemExit as e:         # --help, or a message when the FFI library is missing
            if e.code not in (None, 0):
                print(f"jem bench kernels: error: {e.code}", file=sys.stderr)
                return e.code if isinstance(e.code, int) else 2
        if not os.path.exists(rows_path):       # --help: nothing was measured
            return 0
        with open(rows_path) as f:
            rows = json.load(f)
    common.write_report(ours.json, "kernels", argparse.Namespace(script=script, arguments=rest), rows=rows)
    if ours.plot:
        plot_kernels(rows, ours.plot)
    return 0


def placement_main(argv=None) -> int:
    """`jem plan` (the placement availability planner), with a preset name allowed for --config and
    the machine added to its JSON report."""
    from .plan import main as plan_main
    ours, rest = _split_output_args("jem bench placement", argv)
    rest = list(rest)
    if "--config" in rest[:-1]:
        i = rest.index("--config") + 1
        rest[i] = _preset_path(rest[i])
    if ours.plot:
        rest += ["--plot", ours.plot]
    if not ours.json:
        return plan_main(rest)
    rest += ["--json", ours.json]
    code = plan_main(rest)
    if code == 0:
        with open(ours.json) as f:
            report = json.load(f)
        report = {"benchmark": "placement", "machine": common.machine_record(), "settings": {"arguments": rest}, **report}
        with open(ours.json, "w") as f:
            json.dump(report, f, indent=1)
    return code


def _preset_path(name: str) -> str:
    from ..config import ConfigError
    from ..config import resolve_preset
    try:
        return resolve_preset(name)
    except ConfigError:
        return name          # the planner reports the missing file
