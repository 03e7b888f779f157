#!/usr/bin/env bash
# GPU benchmarks of ds_hydra in one run, written to one results file (markdown, raw JSON at the end):
#   1. experiment=gpt2_124m tokens/s, MFU, peak memory per activation-checkpointing policy
#      (none, ckpt.segments=4, full, selective);
#   2. the largest batch that fits per policy (out-of-memory caught, two steps per probe);
#   3. experiment=nanogpt_gpu to 5000 steps: val loss and wall time.
#
#   bench/gpu.sh                               # a GPU: a few minutes on an H200 -> bench/results/gpu.md
#   bench/gpu.sh --out /tmp/gpu.md             # elsewhere
#   bench/gpu.sh --smoke                       # tiny model on any machine, CPU too (or DS_HYDRA_BENCH_SMOKE=1)
#   bench/gpu.sh --sections throughput --policies none,selective trainer.compile=false
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ "${DS_HYDRA_BENCH_SMOKE:-0}" == 1 ]]; then
  set -- --smoke "$@"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || true
fi
exec "${PYTHON:-python}" bench/gpu_bench.py "$@"
