"""task=prepare throughput against a plain script, side by side in one run (compare ratios, not times).

    python bench/prepare.py                  # 16 MB of text, BPE 8192, prepare with num_proc 1, 2, 4
    python bench/prepare.py --mb 64 --procs 1,2

The corpus: files of 256 KB cut from Tiny Shakespeare at rotating offsets (every file different). The
tokenizer: byte-level BPE with 8192 tokens, trained once beforehand, so neither side pays for training.

* plain: what a user writes by hand (nanoGPT's openwebtext/prepare.py with this tokenizer): read the
  files, ``encode_batch_fast`` them 16 at a time, append the end-of-text id, write uint16 ids.
* prepare: ``prepare_dataset`` with the same tokenizer file (hashing the inputs, chunking, splitting
  train/val, meta.json, the atomic rename: everything ``task=prepare`` does), for each ``num_proc``.

Rounds are interleaved, each in a new order, so drift hits every variant alike; each variant's time is
its fastest round (the median ratio is printed beside it). On a shared machine wall times move with
the neighbours' load; CPU time (this process and its workers) moves much less: with ``--threads 1``
it is the work each variant does per token.
Throughput ratio = plain time / prepare time (target >= 0.9 with one worker).
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FILE_BYTES = 256 << 10
EOS = "<|endoftext|>"


def write_corpus(folder: Path, megabytes: int) -> list:
    from ds_hydra.data.corpus import embedded_corpus_text

    text = embedded_corpus_text()
    folder.mkdir(parents=True)
    files = []
    for i in range(megabytes * (1 << 20) // FILE_BYTES):
        start = (i * 104_729) % (len(text) - FILE_BYTES)
        path = folder / f"doc{i:05d}.txt"
        path.write_text(text[start:start + FILE_BYTES], encoding="utf-8")
        files.append(path)
    return files


def train_tokenizer(files, out: Path) -> Path:
    from omegaconf import OmegaConf

    from ds_hydra.data.tokenizer import train_bpe

    cfg = OmegaConf.create({"vocab_size": 8192, "min_frequency": 2, "eos_token": EOS})
    tokenizer = train_bpe((f.read_text(encoding="utf-8") for f in files[:8]), cfg)
    out.mkdir()
    tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def plain_script(files, tokenizer_file: Path, out: Path) -> int:
    """The hand-written loop: batch encode, append eos, write uint16."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id(EOS)
    total = 0
    with open(out, "wb") as f:
        for i in range(0, len(files), 16):
            texts = [p.read_text(encoding="utf-8") for p in files[i:i + 16]]
            for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
                ids = np.array(enc.ids + [eos], dtype=np.uint16)
                ids.tofile(f)
                total += len(ids)
    return total


def run_prepare(folder: Path, tokenizer_file: Path, out: Path, num_proc: int) -> int:
    from ds_hydra.data.prepare import prepare_dataset
    from ds_hydra.data.prepare_inputs import resolve_inputs

    meta = prepare_dataset(
        resolve_inputs([str(folder)]), out, {"kind": "hf", "path": str(tokenizer_file), "eos_token": EOS},
        num_proc=num_proc, force=True, progress=False,
    )
    return meta["tokens"]["train"] + meta["tokens"]["val"]


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=16, help="corpus size in MB")
    parser.add_argument("--procs", default="1,2,4", help="num_proc values to run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="tokenizer threads per process (RAYON_NUM_THREADS); default: all cores")
    args = parser.parse_args()
    if args.threads:  # before the tokenizers library starts its thread pool
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    procs = [int(p) for p in args.procs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_corpus(tmp / "corpus", args.mb)
        tokenizer_file = train_tokenizer(files, tmp / "tok")
        mb = sum(f.stat().st_size for f in files) / 1e6
        times = {name: [] for name in ["plain"] + [f"prepare num_proc={n}" for n in procs]}
        cpu = {name: [] for name in times}
        tokens = {}
        runs = {"plain": lambda: plain_script(files, tokenizer_file, tmp / "plain.bin")}
        for n in procs:
            runs[f"prepare num_proc={n}"] = lambda n=n: run_prepare(tmp / "corpus", tokenizer_file, tmp / "out", n)
        order = random.Random(0)
        for _ in range(args.rounds):
            for name in order.sample(list(runs), len(runs)):  # a new order each round: no variant always goes first
                started, used = time.perf_counter(), cpu_seconds()
                tokens[name] = runs[name]()
                times[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_seconds() - used)
                shutil.rmtree(tmp / "out", ignore_errors=True)
    plain = min(times["plain"])
    median_plain, cpu_plain = statistics.median(times["plain"]), min(cpu["plain"])
    threads = os.environ.get("RAYON_NUM_THREADS", "all cores")
    print(f"{mb:.1f} MB in {len(files)} files, BPE 8192, tokenizer threads per process: {threads}; "
          f"{args.rounds} rounds in shuffled order: fastest, median, and the least CPU time (all processes)\n")
    print("| variant | tokens | seconds | tokens/s | throughput vs plain | (median) | CPU s | CPU vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in times.items():
        best = min(runs)
        print(f"| {name} | {tokens[name]:,} | {best:.2f} | {tokens[name] / best:,.0f} | {plain / best:.2f} "
              f"| {median_plain / statistics.median(runs):.2f} | {min(cpu[name]):.2f} | {cpu_plain / min(cpu[name]):.2f} |")
    assert len({tokens[name] for name in times}) == 1, f"token counts differ: {tokens}"


if __name__ == "__main__":
    main()
