"""`jem bench`: benchmarks that print a table and write --json FILE (machine and settings included)
and --plot FILE.png.

  jem bench throughput   tokens/s, time to first token, time per output token of a synthetic batch
  jem bench overhead     elastic machinery on / off, alternating runs: ratio of throughputs
  jem bench recovery     ranks failed mid-workload: interruption, breakdown, throughput, vs full restart
  jem bench kernels      the EP kernel benchmark (benchmarks/kernels.py)
  jem bench placement    the placement availability planner (jem plan)
"""
from __future__ import annotations

import sys

SUBCOMMANDS = {
    "throughput": ("throughput", "main"),
    "overhead": ("overhead", "main"),
    "recovery": ("recovery", "main"),
    "kernels": ("external", "kernels_main"),
    "placement": ("external", "placement_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\njem bench: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    import importlib
    module, func = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)(argv[1:])
