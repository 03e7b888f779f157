"""Checkpoint I/O on 2 ranks: ``full`` against ``dcp`` against ``dcp`` + ``async_checkpoint``, side by side in
one run, on GPT-2 small (124M parameters) with its AdamW state, sharded by FSDP (gloo, CPU)::

    nice -n 19 python bench/checkpoint_io.py                  # 2 ranks, GPT-2 small, 4 saves per format
    python bench/checkpoint_io.py --n-layer 2 --saves 2       # a quick try (a smaller model)

Per save and format, on rank 0: the time training is blocked (``Trainer.save`` until it returns: for
async, until the state is copied to CPU memory), the total time until the checkpoint is complete on
disk (async: save, then waiting for the background write with nothing else running, so its pure write
time), and rank 0's peak resident memory during the save above its resident memory just before it.
The saves go through the trainer itself (``Trainer.save``), the formats taking turns, each into a run
directory of its own that keeps only its newest checkpoint. Goal (issue 24): blocked time with async
under a tenth of the full save; rank 0's peak not growing with the whole state (full gathers it all).

An async save copies into CPU buffers it allocates at its first save and reuses (``StagingBuffers``), so
the first async save also pays for the allocation: it is reported apart, the medians are of the rest
(``--saves`` >= 2). Last, the time of one training step while a background write runs against one
with none: what the write costs the steps it overlaps (CPU and the GIL shared with its thread).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MODES = [("full", "full", False), ("dcp", "dcp", False), ("dcp+async", "dcp", True)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident memory of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker(args) -> None:
    """One rank (under torchrun): build the trainer, take one step (AdamW state exists), then save in turns."""
    import torch

    from conftest import compose
    from ds_hydra.training.trainer import Trainer

    torch.set_num_threads(1)
    out = Path(args.out)
    overrides = [
        "experiment=gpt2_124m", "engine=fsdp", "trainer.device=cpu", "trainer.compile=false", "trainer.batch_size=1",
        "model.block_size=64", f"model.n_layer={args.n_layer}", "trainer.keep_last=1", "trainer.async_checkpoint=true",
        "trainer.progress=false", "run.memory_check=off",
    ]
    trainer = Trainer(compose(overrides), out / "full")
    try:
        trainer.train_step()
        n_params = sum(p.numel() for p in trainer.model.parameters())
        records = []
        for i in range(args.saves):
            for name, fmt, asynchronous in MODES:
                trainer.run_dir = out / name.replace("+", "_")
                trainer.checkpoint_format, trainer.async_checkpoint = fmt, asynchronous
                trainer.step += 1  # a new checkpoint name each time (the state is the same)
                trainer.engine.barrier()
                with PeakRSS() as memory:
                    start = time.perf_counter()
                    trainer.save()
                    blocked = time.perf_counter() - start
                    trainer.finish_pending_save()
                    trainer.engine.barrier()  # complete for every rank
                    total = time.perf_counter() - start
                records.append({"mode": name, "save": i, "blocked_s": blocked, "total_s": total,
                                "peak_rss_gib": memory.peak / 2**30, "peak_over_before_gib": (memory.peak - memory.before) / 2**30})
        steps = {"alone": [], "during_write": []}
        trainer.checkpoint_format, trainer.async_checkpoint, trainer.run_dir = "dcp", True, out / "dcp_async"
        for _ in range(args.saves):
            trainer.engine.barrier()
            start = time.perf_counter()
            trainer.train_step()
            steps["alone"].append(time.perf_counter() - start)
            trainer.save()
            start = time.perf_counter()
            trainer.train_step()  # the background write runs meanwhile
            steps["during_write"].append(time.perf_counter() - start)
            trainer.finish_pending_save()
        if trainer.engine.is_main:
            (out / "records.json").write_text(json.dumps({"n_params": n_params, "records": records, "steps": steps}))
    finally:
        trainer.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=12, help="transformer blocks (12: GPT-2 small, 124M parameters)")
    parser.add_argument("--saves", type=int, default=4, help="saves per format (the formats take turns; medians of all but the first)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="checkpoint_io.", dir=os.environ.get("BENCH_DIR")) as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__,
               "--worker", "--out", tmp, "--n-layer", str(args.n_layer), "--saves", str(args.saves)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench failed:\n{proc.stderr[-4000:]}")
        result = json.loads((Path(tmp) / "records.json").read_text())
    records = result["records"]
    print(f"GPT-2 small with n_layer={args.n_layer}: {result['n_params'] / 1e6:.1f}M parameters + AdamW state, "
          f"engine=fsdp on {args.nproc} ranks (gloo, CPU); {args.saves} saves per format, medians; rank 0's memory")
    print()
    print("| format | blocked (s) | total (s) | blocked / full's | rank 0 peak RSS (GiB) | rank 0 peak over before (GiB) |")
    print("|---|---|---|---|---|---|")
    later = lambda r: r["save"] > 0 or args.saves < 2  # noqa: E731  the first async save allocates its buffers
    median = lambda mode, key: statistics.median(r[key] for r in records if r["mode"] == mode and later(r))  # noqa: E731
    full_blocked = median("full", "blocked_s")
    for name, _, _ in MODES:
        print(f"| {name} | {median(name, 'blocked_s'):.2f} | {median(name, 'total_s'):.2f} | "
              f"{median(name, 'blocked_s') / full_blocked:.3f} | {median(name, 'peak_rss_gib'):.2f} | "
              f"{median(name, 'peak_over_before_gib'):.2f} |")
    print()
    first = next(r for r in records if r["mode"] == "dcp+async")
    steps = result["steps"]
    print(f"first dcp+async save (allocating its staging buffers): blocked {first['blocked_s']:.2f} s, "
          f"peak +{first['peak_over_before_gib']:.2f} GiB; medians above: saves 2..{args.saves}")
    print(f"training step (median of {args.saves}): {statistics.median(steps['alone']):.2f} s alone, "
          f"{statistics.median(steps['during_write']):.2f} s while a background write runs")
    print(f"load average (1, 5, 15 min) at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("every save: " + "; ".join(f"{r['mode']} #{r['save']}: blocked {r['blocked_s']:.2f}s total {r['total_s']:.2f}s "
                                     f"peak +{r['peak_over_before_gib']:.2f} GiB" for r in records))


if __name__ == "__main__":
    main()
