"""Data benchmarks, side by side in one run: time per batch against the train step, and resident memory
while training on a small and a large token file.

    python bench/data.py                 # everything (builds an 800 MB token file in a temp dir, deletes it)
    python bench/data.py --only time
    python bench/data.py --only memory --big-mb 800 --steps 300

The token files are a prepared directory (meta.json, char tokenizer) of Tiny Shakespeare's character
ids repeated to the size asked for: 2 MB (1M tokens) and ``--big-mb`` (default 800 MB, 400M tokens).

1. time: in one process, the ``experiment=nanogpt_cpu`` trainer (batch 12 x 64 tokens) on
   ``data=tokens`` of the large file: the mean time of ``next_batch`` (random windows and sequential
   epochs, each from a file mapped afresh per batch) against the mean time of a whole train step
   (its own batch included). Target: data <= 1% of the step.
2. memory: ``python -m ds_hydra experiment=nanogpt_cpu data=tokens data.dir=<small|large>`` for
   ``--steps`` steps, each in its own process; peak resident memory (that process's VmHWM).
   Target: small and large within 50 MiB. Beside it, what the two obvious alternatives cost on the
   large file: reading it into memory (``np.fromfile``), and one ``np.memmap`` kept open while
   drawing the windows of ``--draws`` batches (touched pages stay resident) against ds_hydra's
   map-per-batch source drawing the same windows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MiB = 1 << 20


def make_token_dir(folder: Path, n_tokens: int) -> Path:
    """A prepared directory of ``n_tokens`` char ids (Tiny Shakespeare repeated) plus a 100k-token val split."""
    from ds_hydra.data.corpus import embedded_corpus_text
    from ds_hydra.data.tokens import DATA_FORMAT
    from ds_hydra.data.tokenizer import CharTokenizer

    text = embedded_corpus_text()
    tokenizer = CharTokenizer.fit(text)
    ids = tokenizer.encode_array(text).astype(np.uint16)
    folder.mkdir(parents=True)
    with open(folder / "train.bin", "wb") as f:
        left = n_tokens
        while left > 0:
            ids[:left].tofile(f)
            left -= min(left, len(ids))
    ids[-100_000:].tofile(folder / "val.bin")
    tokenizer.save(folder)
    meta = {"format": DATA_FORMAT, "vocab_size": tokenizer.vocab_size, "dtype": "uint16",
            "tokens": {"train": n_tokens, "val": 100_000}, "tokenizer": tokenizer.describe()}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def train_overrides(data_dir: Path, *extra: str):
    return ["experiment=nanogpt_cpu", "data=tokens", f"data.dir={data_dir}", "trainer.progress=false", *extra]


# -- 1. time per batch against the step --------------------------------------------------------------


def bench_time(big: Path, batches: int, steps: int) -> None:
    import torch

    from conftest import compose
    from ds_hydra.training.trainer import Trainer

    rows = []
    for name, overrides in (
        ("data=tokens, random windows", train_overrides(big)),
        ("data=tokens, sequential epochs", train_overrides(big, "data.sampling=sequential")),
        ("data=shakespeare_char (in memory)", ["experiment=nanogpt_cpu", "trainer.progress=false"]),
    ):
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(compose(overrides), Path(run_dir))
            sampler, device = trainer.train_batches, trainer.device
            for _ in range(20):
                sampler.next_batch(device)
                trainer.train_step()
            data_s = _mean_time(lambda: sampler.next_batch(device), batches)
            step_s = _mean_time(lambda: trainer.train_step().item(), steps)
        rows.append((name, data_s, step_s))
    print(f"\n1. time per batch (batch {trainer.cfg.trainer.batch_size} x {trainer.seq_len} tokens, mean of {batches:,} batches) "
          f"against the nanogpt_cpu train step (mean of {steps} steps); torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| data | next_batch | train step | data / step | target |")
    print("|---|---|---|---|---|")
    for name, data_s, step_s in rows:
        print(f"| {name} | {data_s * 1e6:.0f} us | {step_s * 1e3:.2f} ms | {data_s / step_s:.2%} | <= 1% |")


def _mean_time(fn, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


# -- 2. resident memory -------------------------------------------------------------------------------


def peak_rss_of(cmd, env=None) -> float:
    """Peak resident memory (MiB) of the process ``cmd`` runs (its exit status must be 0): the kernel's
    high-water mark of that process's own memory (VmHWM), read until it exits. Not ru_maxrss, which a
    child inherits from the parent it was forked from."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_kib = 0
    status_file = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except (OSError, ValueError):
            pass  # exiting between poll() and the read
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return peak_kib / 1024


def bench_memory(small: Path, big: Path, steps: int, draws: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for name, folder, extra in (
            ("2 MB, random windows", small, []),
            (f"{_mb(big)} MB, random windows", big, []),
            (f"{_mb(big)} MB, sequential epochs", big, ["data.sampling=sequential"]),
        ):
            cmd = [sys.executable, "-m", "ds_hydra", *train_overrides(folder, *extra), f"trainer.max_steps={steps}",
                   f"trainer.eval_interval={steps}", f"hydra.run.dir={runs}/{len(rows)}"]
            rows.append((name, peak_rss_of(cmd, env)))
    print(f"\n2. peak resident memory of `python -m ds_hydra experiment=nanogpt_cpu data=tokens` over {steps} steps\n")
    print("| token file | peak RSS | vs 2 MB |")
    print("|---|---|---|")
    for name, rss in rows:
        print(f"| {name} | {rss:.0f} MiB | {rss - rows[0][1]:+.0f} MiB |")
    print("\n   the alternatives on the same files (no training: a process that only reads)\n")
    probe = [sys.executable, __file__, "--probe"]
    alternatives = [
        ("np.fromfile (the file read into memory)", "fromfile"),
        (f"one np.memmap kept open, {draws:,} batches of random windows", "memmap"),
        (f"ds_hydra's FileTokens (mapped per batch), the same {draws:,} batches", "filetokens"),
    ]
    print("| reader | 2 MB | " + f"{_mb(big)} MB | difference |")
    print("|---|---|---|---|")
    for name, how in alternatives:
        sizes = [peak_rss_of([*probe, how, str(folder / "train.bin"), str(draws)], env) for folder in (small, big)]
        print(f"| {name} | {sizes[0]:.0f} MiB | {sizes[1]:.0f} MiB | {sizes[1] - sizes[0]:+.0f} MiB |")


def probe(how: str, path: str, draws: int) -> None:
    """One reader of a uint16 token file, run in its own process so its peak RSS is its own."""
    import torch

    from ds_hydra.data.batches import RandomBlocks
    from ds_hydra.data.token_stream import FileTokens

    n = os.path.getsize(path) // 2
    if how == "fromfile":
        tokens = np.fromfile(path, dtype=np.uint16)
        assert len(tokens) == n
    else:
        source = np.memmap(path, dtype=np.uint16, mode="r") if how == "memmap" else FileTokens(Path(path), np.uint16, n)
        sampler = RandomBlocks(source, 64, 12, seed=0)
        for _ in range(draws):
            sampler.next_batch(torch.device("cpu"))
    time.sleep(0.3)  # the parent reads the high-water mark every 20 ms: let it see the last one


def _mb(folder: Path) -> int:
    return round((folder / "train.bin").stat().st_size / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=["time", "memory"])
    parser.add_argument("--big-mb", type=int, default=800, help="size of the large token file (MB)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per memory run")
    parser.add_argument("--batches", type=int, default=2000, help="next_batch calls timed")
    parser.add_argument("--draws", type=int, default=20_000, help="batches drawn by the reader probes")
    parser.add_argument("--probe", nargs=3, metavar=("HOW", "PATH", "DRAWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], args.probe[1], int(args.probe[2]))
        return
    only = set(args.only or ["time", "memory"])
    with tempfile.TemporaryDirectory(prefix="ds_hydra_bench_data_") as tmp:
        small = make_token_dir(Path(tmp) / "small", 1 << 20)
        big = make_token_dir(Path(tmp) / "big", args.big_mb * 1_000_000 // 2)
        os.sync()  # written out before anything is timed: writeback would steal from the measured steps
        print(f"token files: {_mb(small)} MB and {_mb(big)} MB (uint16) in {tmp} (deleted at the end)")
        if "time" in only:
            bench_time(big, args.batches, steps=100)
        if "memory" in only:
            bench_memory(small, big, args.steps, args.draws)


if __name__ == "__main__":
    main()
