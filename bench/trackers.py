"""What the trackers cost a run, side by side in one run (compare ratios, not times).

    python bench/trackers.py                 # 300 records per tracker set, 3 interleaved rounds
    python bench/trackers.py --records 1000 --rounds 5

For each set of ``logger`` options the script opens a ``MetricsLogger`` in a fresh run dir (with
W&B offline and MLflow on a local SQLite store, as by default), writes ``--records`` records of
the shape a training run logs (loss, lr, tokens/s), and finishes it with final metrics and the loss
curve. The table shows the start and finish cost (once per run) and the cost of one logged record
(median over rounds), and what that adds to a training step at ``trainer.log_interval=10`` against
the nanoGPT-CPU step time of README's results table (28.77 ms). MLflow queues records and sends them
every 5 s (one database commit, about as long as one record sent alone: the last row), so its cost
is per second of the run, not per step; the finish column includes its last send.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

STEP_MS = 28.77  # README: nanoGPT-CPU train step on this machine kind (bench/train.py)
LOG_INTERVAL = 10  # trainer.log_interval's default: one record per 10 steps
SETS = {
    "jsonl": "logger=[jsonl]",
    "+csv": "logger=[jsonl,csv]",
    "+tensorboard": "logger=[jsonl,tensorboard]",
    "+wandb (offline)": "logger=[jsonl,wandb]",
    "+mlflow (sqlite)": "logger=[jsonl,mlflow]",
    "all five": "logger=[jsonl,csv,tensorboard,wandb,mlflow]",
}


def one_run(override: str, records: int, root: Path):
    """(start s, per-record s, finish s) of one MetricsLogger with the trackers ``override`` chooses."""
    from conftest import TINY, compose

    from ds_hydra.training.slices import tracked_run
    from ds_hydra.training.metrics import MetricsLogger

    cfg = compose([*TINY, override])
    run_dir = Path(tempfile.mkdtemp(dir=root))
    started = time.perf_counter()
    metrics = MetricsLogger(run_dir, tracked_run(cfg))
    opened = time.perf_counter()
    for step in range(1, records + 1):
        metrics.log(step * LOG_INTERVAL, loss=4.0 / step, lr=1e-3, tokens_per_s=25_000.0 + step)
    logged = time.perf_counter()
    metrics.finish({"step": records * LOG_INTERVAL, "val_loss": 1.9, "train_loss": 1.8, "tokens_per_s": 25_000.0})
    return opened - started, (logged - opened) / records, time.perf_counter() - logged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ds_hydra_trackers_"))
    os.chdir(root)  # MLflow's default store: <cwd>/outputs/mlflow.db
    one_run(SETS["all five"], 5, root)  # imports and the MLflow tables, outside the timings
    results = {name: [] for name in SETS}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every set alike
        for name, override in SETS.items():
            results[name].append(one_run(override, args.records, root))
    send_s = statistics.median(mlflow_send_s(root) for _ in range(args.rounds))
    base = statistics.median(r[1] for r in results["jsonl"])
    print(f"{args.records} records x {args.rounds} rounds; step overhead at log_interval={LOG_INTERVAL} vs a {STEP_MS} ms step\n")
    print("| loggers | start s | per record ms | x jsonl | finish s | step overhead |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        start, per, finish = (statistics.median(r[i] for r in runs) for i in range(3))
        overhead = per * 1e3 / LOG_INTERVAL / STEP_MS
        print(f"| {name} | {start:.2f} | {per * 1e3:.3f} | {per / base:.1f} | {finish:.2f} | {overhead:.2%} |")
    print(f"\nMLflow, one send (a record sent alone): {send_s * 1e3:.1f} ms, every 5 s: {send_s / 5:.2%} of the run's time")


def mlflow_send_s(root: Path) -> float:
    """The time of one MLflow batch send of one record, as an unbatched tracker would pay per record."""
    from conftest import TINY, compose

    from ds_hydra.training.slices import tracked_run
    from ds_hydra.training.metrics import MetricsLogger

    metrics = MetricsLogger(Path(tempfile.mkdtemp(dir=root)), tracked_run(compose([*TINY, "logger=[jsonl,mlflow]"])))
    (tracker,) = metrics.trackers.active
    metrics.log(10, loss=4.0, lr=1e-3, tokens_per_s=25_000.0)
    started = time.perf_counter()
    tracker._send()
    took = time.perf_counter() - started
    metrics.finish({"step": 10})
    return took


if __name__ == "__main__":
    main()
