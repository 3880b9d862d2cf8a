#!/usr/bin/env bash
# The `jem bench` runs of benchmarks/RESULTS.md's GPU-host section, in one go (device time is scarce):
# throughput and overhead (with the decode step's XLA cost analysis) on the one GPU (1 rank, bfloat16),
# then recovery on that host's CPU cores with fake devices (JAX_PLATFORMS=cpu; one GPU gives one rank).
#   benchmarks/bench_gpu_host.sh OUTDIR
set -uo pipefail
out=${1:?usage: $0 OUTDIR}
export PYTHONPATH=$(cd "$(dirname "$0")/.." && pwd) PYTHONUNBUFFERED=1
jem() { echo "+ jem $*"; python3 -m jax_elastic_moe.cli "$@"; }
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } | tee "$out/host.txt"
w="--config small --ranks 1 --redundant 4 --dtype bfloat16 --batch 64 --prompt-len 128 --new-tokens 64 --quiet"
jem bench throughput $w --repeats 5 --json "$out/gpu_throughput.json" --plot "$out/gpu_throughput.png"
jem bench overhead $w --repeats 10 --json "$out/gpu_overhead.json" --plot "$out/gpu_overhead.png"

export JAX_PLATFORMS=cpu
jem bench recovery --mode spmd --ranks 4 --redundant 8 --fail 1,2 --json "$out/cpu16_recovery4.json" --plot "$out/cpu16_recovery4.png"
jem bench recovery --mode spmd --ranks 8 --redundant 8 --fail 1,2 --json "$out/cpu16_recovery8.json"
