"""What every `jem bench` subcommand shares: the machine record, the options of a synthetic
workload, engine construction per runtime mode, latency summaries, the printed table, the JSON
report, PNG plots and the progress bar."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np

from ..kinds import Mode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

MODES = [m.value for m in Mode]


class SettingsError(ValueError):
    """Benchmark settings that cannot produce the measurement asked for."""


def run_start_record() -> dict:
    """What describes the machine as a run starts (no JAX: it must not start before the devices are
    set up): date, host, CPU, cores, load average, Python, the git commit, the command line."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "command": (" ".join(["jem"] + sys.argv[1:]) if os.path.basename(sys.argv[0]) in ("jem", "cli.py")
                    else " ".join(sys.argv)),
    }


def machine_record(started: dict | None = None) -> dict:
    """Where a benchmark ran: run_start_record() (taken now unless given) plus JAX and its devices."""
    import jax
    devices = jax.devices()
    return {**(started or run_start_record()), "jax": jax.__version__, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device_count": len(devices)}


def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo), or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit, with "+changes" when tracked files differ from it."""
    root = REPO_ROOT
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+changes" if dirty else "")) or None


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{v} is not >= {low}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a bad value is a usage error: one line, exit status 2)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def add_workload_args(ap: argparse.ArgumentParser, *, config="small", ranks=4, redundant=4, batch=16,
                      prompt_len=32, new_tokens=32):
    """The options of a synthetic batch workload and of the engine that serves it."""
    ap.add_argument("--config", default=config, help="model preset name or YAML path (random weights)")
    ap.add_argument("--mode", default="spmd", choices=MODES, help="runtime mode of the engine")
    ap.add_argument("--ranks", type=positive_int, default=ranks, help="expert-parallel ranks")
    ap.add_argument("--redundant", type=nonnegative_int, default=redundant, help="redundant expert slots (in all)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=positive_int, default=batch, help="prompts in the batch")
    ap.add_argument("--prompt-len", type=positive_int, default=prompt_len, help="tokens per prompt")
    ap.add_argument("--new-tokens", type=positive_int, default=new_tokens, help="output tokens per prompt (no stop token)")
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the weights and the prompts")


def add_output_args(ap: argparse.ArgumentParser):
    ap.add_argument("--json", metavar="FILE", help="write the report (machine, settings, rows) as JSON")
    ap.add_argument("--plot", metavar="FILE.png", help="write a PNG plot")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


def synthetic_prompts(num: int, length: int, vocab: int, seed: int, vary: bool = False) -> list[list[int]]:
    """`num` random prompts of `length` tokens (ids 2..vocab-1), or of length//2..length with vary."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(max(1, length // 2), length + 1, size=num) if vary else [length] * num
    return [rng.randint(2, vocab, size=int(n)).tolist() for n in lengths]


def use_cpu_devices(n: int):
    """On a CPU-only machine, asks JAX for at least n fake devices before it starts (never fewer than
    already asked for; no effect once JAX has started)."""
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1, jax.config.jax_num_cpu_devices))
    except Exception:  # backends already initialised: keep what is there
        pass


def seqs_per_rank(args) -> int:
    """Decode slots per rank for --batch requests in all, over the ranks that stay alive when a
    benchmark fails some (args.survivors; default all): the KV-cache headroom that lets survivors take
    the dead ranks' requests at once, as redundant experts are the weights' headroom."""
    return max(1, -(-args.batch // getattr(args, "survivors", args.ranks)))


def prefill_steps(args, chunk: int = 256) -> int:
    """Steps the engine takes to prefill --prompt-len tokens in chunks (engine default chunk)."""
    return -(-args.prompt_len // min(chunk, args.prompt_len + args.new_tokens))


def engine_kwargs(args, *, redundant: int | None = None, **extra) -> dict:
    """Keyword arguments of Engine.from_config for the workload options. `mode` is passed only for
    mooncake: spmd is the engine's default."""
    kw = dict(num_ranks=args.ranks, redundant_experts=args.redundant if redundant is None else redundant,
              seed=args.seed, dtype=args.dtype, seqs_per_rank=seqs_per_rank(args),
              prefill_rows=seqs_per_rank(args), max_model_len=args.prompt_len + args.new_tokens)
    kw.update(extra)
    if args.mode != "spmd":
        kw["mode"] = args.mode
    return kw


def build_engine(args, **kw):
    import jax_elastic_moe as jem
    return jem.Engine.from_config(args.config, **engine_kwargs(args, **kw))


def summary(values) -> dict:
    """mean, p50, p99, min, max of a list of numbers (nearest-rank percentiles)."""
    v = np.sort(np.asarray(values, np.float64))
    if v.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p99": None, "min": None, "max": None}
    pick = lambda q: float(v[min(v.size - 1, max(0, int(np.ceil(q * v.size)) - 1))])  # noqa: E731
    return {"n": int(v.size), "mean": float(v.mean()), "p50": pick(0.50), "p99": pick(0.99),
            "min": float(v[0]), "max": float(v[-1])}


def spread(values) -> dict:
    """median, min, max and interquartile range of repeated measurements."""
    v = np.asarray(values, np.float64)
    q1, q3 = np.percentile(v, [25, 75])
    return {"median": float(statistics.median(v)), "min": float(v.min()), "max": float(v.max()),
            "iqr": float(q3 - q1), "n": int(v.size)}


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table: right-aligned columns, floats to 4 significant digits."""
    def text(v):
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    cells = [[text(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def settings_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("json", "plot", "quiet")}


def write_report(path: str | None, benchmark: str, args, started: dict | None = None, **body) -> dict:
    """The report {benchmark, machine, settings, **body}; written as JSON to `path` when given.
    started: run_start_record() of when the run started (default: now)."""
    report = {"benchmark": benchmark, "machine": machine_record(started), "settings": settings_of(args), **body}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def run_subcommand(benchmark: str, ap: argparse.ArgumentParser, argv, run, table, plot) -> int:
    """Parses argv (the output options added), runs the benchmark, prints its table, writes the JSON
    report and the plot. Settings that cannot be measured: a message and exit status 2."""
    add_output_args(ap)
    args = ap.parse_args(argv)
    started = run_start_record()
    try:
        result = run(args)
    except (SettingsError, ValueError, TypeError) as e:     # settings the engine refused, too
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(table(result, args))
    write_report(args.json, benchmark, args, started=started, **result)
    if args.plot:
        plot(result, args.plot)
    return 0


def new_figure(*shape, **kw):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*shape, **kw)


def save_figure(fig, path: str):
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr over `total` units of work (disabled with quiet)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)


def step_rates(step_log: list[tuple[float, int]], start: float) -> list[tuple[float, float]]:
    """[(seconds since start, tokens/s)] per step of `step_log` (end time, tokens), each step's rate
    over the interval since the previous step's end (or `start` for the first)."""
    out, prev = [], start
    for t, tokens in step_log:
        out.append((t - start, tokens / max(t - prev, 1e-9)))
        prev = t
    return out


def decode_rate(step_log: list[tuple[float, int]]) -> float | None:
    """Tokens/s over the steps of `step_log` after its first (whose interval is not known):
    tokens of steps 2..n over the time from the end of step 1 to the end of step n."""
    if len(step_log) < 2:
        return None
    tokens = sum(n for _, n in step_log[1:])
    return tokens / max(step_log[-1][0] - step_log[0][0], 1e-9)
