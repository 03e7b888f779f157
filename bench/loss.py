"""Loss benchmarks, side by side: the chunked loss's peak memory against the plain one, the token-count
all-reduce's cost per step, and packed against padded SFT rows.

    python bench/loss.py                      # everything on the CPU (a few minutes on 2 cores)
    python bench/loss.py --only memory        # memory | allreduce | packing
    python bench/loss.py --only memory --device cuda

1. memory: a built-in GPT (2 layers, width 256) on a batch of ``--tokens`` tokens (1 x 1024) with a
   vocabulary of 32,000 and of 150,000: the peak above what is allocated before forward, through
   forward and backward of the step's loss (``ds_hydra.loss.step.mean_loss``), for ``loss=cross_entropy``
   and ``loss=chunked_cross_entropy`` (``--chunk``, 256 tokens per chunk), and the time of that forward-backward.
   CPU peaks come from ``torch.profiler(profile_memory=True)``, as bench/memory.py measures; CUDA
   peaks from ``max_memory_allocated``.
2. allreduce: 2 processes on gloo (CPU): the mean time of the one-integer all-reduce the trainer adds per
   step (the step's label tokens), against the time of a ``model=gpt_tiny`` train step of batch 12.
3. packing: ``data=sft`` rows padded (one example per row) and packed (``data.pack=true``), on the shipped
   example set and on a generated JSONL of 2,400 examples of varied length: the pad fraction (positions
   that hold no example token) and training throughput of a ``gpt_small``-shaped model, as row tokens/s
   (what the trainer logs) and example tokens/s (the tokens of the examples, padding excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

MiB = 2**20


# -- 1. memory ------------------------------------------------------------------------------------------
def memory(device_name: str, tokens: int, chunk: int) -> None:
    import torch

    from memory import step_peak_above
    from ds_hydra.loss.cross_entropy import ChunkedCrossEntropyLoss, CrossEntropyLoss
    from ds_hydra.loss.step import mean_loss
    from ds_hydra.models.gpt import GPT

    device = torch.device(device_name)
    T = 1024
    B = max(1, tokens // T)
    print(f"\n## chunked vs plain loss: GPT 2 x 256, batch {B} x {T} tokens, fp32, {device}\n")
    print("| vocab | loss | peak above start MiB | fwd+bwd ms | full logits MiB (fp32) |")
    print("|---|---|---|---|---|")
    for vocab in (32_000, 150_000):
        torch.manual_seed(0)
        model = GPT(vocab_size=vocab, n_layer=2, n_head=4, n_embd=256, block_size=T).to(device)
        batch = {"input_ids": torch.randint(vocab, (B, T), device=device), "labels": torch.randint(vocab, (B, T), device=device)}
        for name, loss_fn in (("cross_entropy", CrossEntropyLoss()), (f"chunked_cross_entropy ({chunk})", ChunkedCrossEntropyLoss(chunk))):
            def step():
                model.zero_grad(set_to_none=True)
                mean_loss(model, loss_fn, batch).backward()

            step()  # warm-up
            model.zero_grad(set_to_none=True)
            peak = step_peak_above(step, device)  # (the profiler's own time is not counted below)
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - started) * 1e3
            print(f"| {vocab:,} | {name} | {peak / MiB:,.0f} | {ms:,.0f} | {B * T * vocab * 4 / MiB:,.0f} |", flush=True)
        del model


# -- 2. the all-reduce ------------------------------------------------------------------------------------
def _allreduce_worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    count = torch.tensor(12345, dtype=torch.int64)
    for _ in range(50):
        dist.all_reduce(count.clone())
    n = 2000
    dist.barrier()
    started = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(count.clone())
    elapsed = (time.perf_counter() - started) / n
    if rank == 0:
        queue.put(elapsed)
    dist.destroy_process_group()


def allreduce() -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    from conftest import compose
    from ds_hydra.training.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    per_call = queue.get(timeout=300)
    for p in procs:
        p.join()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(compose(["model=gpt_tiny", "trainer.batch_size=12", "trainer.device=cpu", "trainer.compile=false",
                                   "trainer.progress=false"]), Path(tmp))
        for _ in range(3):
            trainer.train_step()
        n = 30
        started = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        step = (time.perf_counter() - started) / n
    print("\n## the step's token count all-reduce (2 ranks, gloo, CPU)\n")
    print("| one-integer all-reduce | gpt_tiny train step (batch 12, 1 thread) | share of the step |")
    print("|---|---|---|")
    print(f"| {per_call * 1e6:,.0f} us | {step * 1e3:,.2f} ms | {per_call / step:.2%} |")


# -- 3. packing -------------------------------------------------------------------------------------------
def varied_jsonl(path: Path, n: int = 2400, seed: int = 0) -> Path:
    """``n`` prompt/response records of varied length (prompts 20-300 characters, responses 10-900,
    log-uniform), cut from Tiny Shakespeare."""
    from ds_hydra.data.corpus import embedded_corpus_text

    text = embedded_corpus_text()
    rng = random.Random(seed)

    def piece(lo: int, hi: int) -> str:
        length = int(round(lo * (hi / lo) ** rng.random()))
        start = rng.randrange(len(text) - length)
        return text[start:start + length]

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": piece(20, 300), "response": piece(10, 900)}) + "\n")
    return path


def packing(steps: int) -> None:
    import torch

    from conftest import compose
    from ds_hydra.training.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        big = varied_jsonl(Path(tmp) / "varied.jsonl")
        sets = {"shipped example (sft_example.jsonl)": [], "2,400 varied examples": [f"data.path={big}"]}
        print(f"\n## packed vs padded SFT rows (gpt_small shape 4 x 128, rows of 512, batch 8, {steps} steps, 1 thread)\n")
        print("| data | rows | examples kept | pad fraction | row tokens/s | example tokens/s | example tokens/s ratio |")
        print("|---|---|---|---|---|---|---|")
        for name, extra in sets.items():
            results = {}
            for pack in (False, True):
                cfg = compose(["data=sft", "model.block_size=512", "trainer.batch_size=8", "trainer.device=cpu", "trainer.compile=false",
                               "trainer.progress=false", f"data.pack={str(pack).lower()}", "tokenizer.eos_token='<|endoftext|>'", *extra])
                trainer = Trainer(cfg, Path(tmp) / f"run_{pack}")
                inputs, labels, _ = trainer.data.rows("train", trainer.seq_len)
                lengths = [min(len(ids) - 1, trainer.seq_len) for ids, trained in trainer.data.examples["train"]
                           if (trained[1:trainer.seq_len + 1]).any()]
                real = sum(lengths)
                pad = 1 - real / inputs.size
                trainer.train_step()
                started = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                elapsed = time.perf_counter() - started
                row_tps = steps * 8 * trainer.seq_len / elapsed
                results[pack] = (len(inputs), len(lengths), pad, row_tps, row_tps * (1 - pad))
            for pack in (False, True):
                rows, kept, pad, row_tps, real_tps = results[pack]
                ratio = real_tps / results[False][4]
                print(f"| {name}, {'packed' if pack else 'padded'} | {rows} | {kept} | {pad:.1%} | {row_tps:,.0f} | {real_tps:,.0f} | {ratio:.2f}x |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="memory | allreduce | packing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per batch of the memory benchmark")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the chunked loss")
    ap.add_argument("--steps", type=int, default=10, help="timed train steps per packing case")
    args = ap.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    parts = args.only or ["memory", "allreduce", "packing"]
    if "memory" in parts:
        memory(args.device, args.tokens, args.chunk)
    if "allreduce" in parts:
        allreduce()
    if "packing" in parts:
        packing(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
