#!/usr/bin/env bash
# Data-parallel training on every GPU of this machine, one results file (markdown, raw JSON at the end):
#   one process (engine=auto, the baseline), then for each engine
#   torchrun --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) -m ds_hydra experiment=gpt2_124m engine=<ddp|fsdp>
#   -> tokens/s per GPU and in total (median of the log windows after the first, which compiles),
#      scaling against the one-process run, MFU, and the peak memory of every rank.
#
#   bench/distributed_gpu.sh                          # GPUs -> bench/results/distributed_gpu.md
#   bench/distributed_gpu.sh --engines ddp,fsdp,deepspeed --steps 100 --out /tmp/dist.md
#   bench/distributed_gpu.sh --smoke                  # any machine, CPU too: gpt_tiny, 2 gloo ranks, a minute
#   bench/distributed_gpu.sh -- trainer.batch_size=32 # more overrides for every run, after --
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"

OUT=bench/results/distributed_gpu.md
ENGINES=ddp,fsdp
STEPS=60
NPROC=""
SMOKE=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --engines) ENGINES="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "distributed_gpu.sh: unknown argument $1 (see the header of this file)" >&2; exit 2 ;;
  esac
done

if [[ "$SMOKE" == 1 ]]; then
  NPROC="${NPROC:-2}"
  [[ "$STEPS" == 60 ]] && STEPS=12
  RUN=(model=gpt_tiny trainer.device=cpu trainer.batch_size=8 trainer.log_interval=3)
  export OMP_NUM_THREADS=1
else
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "distributed_gpu.sh: no nvidia-smi here; use --smoke for the CPU check" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
  NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
  RUN=(experiment=gpt2_124m trainer.log_interval=10)
fi
# Short runs: warmup inside the run, evaluation only at the end, no checkpoints but the final one.
RUN+=(trainer.max_steps="$STEPS" scheduler.warmup_steps=2 trainer.eval_interval=0 trainer.eval_batches=2 trainer.progress=false)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ds_hydra_dist.XXXXXX")"
echo "runs under $WORK; $NPROC processes per engine"
STATUS=()
run() {  # label, command...
  local label="$1"; shift
  local started=$SECONDS rc=0
  echo "== $label: $*"
  timeout 1200 "$@" >"$WORK/$label.out" 2>&1 || rc=$?
  STATUS+=("$label=$rc:$((SECONDS - started))")
  [[ $rc == 0 ]] || { echo "   $label failed (exit $rc); last lines:"; tail -n 15 "$WORK/$label.out"; }
}

run single "$PY" -m ds_hydra "${RUN[@]}" engine=auto "hydra.run.dir=$WORK/single" "${EXTRA[@]}"
IFS=, read -ra ENGINE_LIST <<<"$ENGINES"
for engine in "${ENGINE_LIST[@]}"; do
  run "$engine" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m ds_hydra \
    "${RUN[@]}" engine="$engine" "hydra.run.dir=$WORK/$engine" "${EXTRA[@]}"
done

mkdir -p "$(dirname "$OUT")"
"$PY" - "$WORK" "$OUT" "$NPROC" "${STATUS[@]}" <<'PYEOF'
"""Summarise the runs: rank 0's metrics.jsonl, every rank's log (for its peak memory)."""
import json
import platform
import re
import statistics
import sys
from pathlib import Path

work, out, nproc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
status = dict(s.split("=", 1) for s in sys.argv[4:])
MEM = re.compile(r"step \d+/\d+: .*mem ([\d.]+)GiB")


def summarise(label):
    run_dir = work / label
    rc, wall = status[label].split(":")
    row = {"run": label, "exit": int(rc), "wall_s": int(wall), "world": 1 if label == "single" else nproc}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return row
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = [r for r in records if "tokens_per_s" in r and "loss" in r]
    steady = windows[1:] or windows  # the first window includes compilation
    if steady:
        row["tokens_per_s_per_gpu"] = statistics.median(r["tokens_per_s"] for r in steady)
        row["tokens_per_s_total"] = row["tokens_per_s_per_gpu"] * row["world"]
        mfu = [r["mfu"] for r in steady if "mfu" in r]
        if mfu:
            row["mfu"] = statistics.median(mfu)
        row["final_loss"] = windows[-1]["loss"]
    logs = sorted(run_dir.glob("rank*.log")) or sorted(run_dir.glob("*.log"))
    peaks = {}
    for log in logs:
        found = MEM.findall(log.read_text(errors="replace"))
        if found:
            peaks[log.stem] = max(float(x) for x in found)
    if not peaks and "peak_memory_gib" in (windows[-1] if windows else {}):
        peaks["rank0"] = windows[-1]["peak_memory_gib"]
    row["peak_memory_gib"] = peaks
    return row


rows = [summarise(label) for label in status]
base = next((r.get("tokens_per_s_total") for r in rows if r["run"] == "single"), None)
for r in rows:
    if base and r.get("tokens_per_s_total"):
        r["scaling_vs_single"] = r["tokens_per_s_total"] / base


def fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"


lines = [
    "# ds_hydra data-parallel benchmark",
    "",
    f"{nproc} processes per engine; {platform.node()}; rank 0 logs the tokens/s (median of the windows after the first).",
    "",
    "| run | world | exit | tokens/s per GPU | tokens/s total | x single | MFU | peak GiB per rank | final loss | wall s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    peaks = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(r.get("peak_memory_gib", {}).items())) or "-"
    lines.append(
        f"| {r['run']} | {r['world']} | {r['exit']} | {fmt(r.get('tokens_per_s_per_gpu'), ',.0f')} | "
        f"{fmt(r.get('tokens_per_s_total'), ',.0f')} | {fmt(r.get('scaling_vs_single'), '.2f')} | "
        f"{fmt(r.get('mfu'), '.1%')} | {peaks} | {fmt(r.get('final_loss'), '.4f')} | {r['wall_s']} |"
    )
lines += ["", "```json", json.dumps(rows, indent=1), "```", ""]
out.write_text("\n".join(lines))
print("\n".join(lines[:6 + len(rows)]))
print(f"wrote {out}")
sys.exit(0 if all(r["exit"] == 0 for r in rows) else 1)
PYEOF
