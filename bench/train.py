"""Training benchmarks, printed side by side in one run (machines are noisy: compare ratios, not times).

    python bench/train.py               # all of them
    python bench/train.py --only step   # ds_hydra step vs a plain PyTorch loop
    python bench/train.py --only hf     # the same for model=hf_llama (transformers' LlamaForCausalLM)
    python bench/train.py --only nanogpt --only startup
    python bench/train.py --only startup_run --repeats 11

1. step: the ds_hydra train step against a hand-written PyTorch loop over the same model, batch and
   optimizer (target ratio <= 1.02), rounds interleaved so drift hits both alike.
2. hf: the same comparison for `model=hf_llama`: ds_hydra's step against a hand-written loop over the
   same transformers model, AdamW, loss and batches (target <= 1.02).
3. nanogpt: `python -m ds_hydra experiment=nanogpt_cpu` end to end: final val loss vs nanoGPT's
   published 1.88, and wall time (nanoGPT itself took about 70 s on this kind of machine).
4. startup: `python -m ds_hydra --cfg job` against `python -c "import torch"` (target <= 1.25x).
5. startup_run: a one-step `model=gpt_tiny` training run end to end against `python -c` that imports
   torch and builds an AdamW (target <= 1.3x): what ds_hydra adds to torch's own start (composition,
   validation, the memory preflight, the run dir, the first step, the final checkpoint). Repeats are
   interleaved; wall and CPU time (user + sys of the child) are medians.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def plain_pytorch_step_fn(model, tokens, seq_len: int, batch_size: int):
    """The loop a user would write by hand: the same model, AdamW, clip, warm-up lr set per step, the
    cross-entropy of the logits it returns (``.logits`` for a transformers model)."""
    import torch
    import torch.nn.functional as F

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99)
    )
    gen = torch.Generator().manual_seed(0)
    T, B = seq_len, batch_size
    it = [0]

    def step():
        lr = 1e-3 * min(1.0, (it[0] + 1) / 101)
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(tokens) - T, (B,), generator=gen)
        x = torch.stack([tokens[i : i + T] for i in ix])
        y = torch.stack([tokens[i + 1 : i + 1 + T] for i in ix])
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        it[0] += 1
        return loss.detach()

    return step


def bench_step(rounds: int, steps: int, overrides) -> dict:
    """ds_hydra's train step against the hand-written loop over a fresh copy of the same model."""
    import copy

    import numpy as np
    import torch

    from conftest import compose
    from ds_hydra.models.build import build_model
    from ds_hydra.training.trainer import Trainer

    cfg = compose([*overrides, "trainer.progress=false", "trainer.device=cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        torch.manual_seed(cfg.trainer.seed)
        model = build_model(cfg.model, trainer.data.vocab_size)
        if getattr(getattr(model, "config", None), "use_cache", False):
            model.config.use_cache = False  # as anyone training a transformers model by hand would
        tokens = torch.as_tensor(np.asarray(trainer.data.tokens("train")), dtype=torch.long)  # the plain loop slices a tensor
        plain = plain_pytorch_step_fn(copy.deepcopy(model), tokens, trainer.seq_len, cfg.trainer.batch_size)
        ours = trainer.train_step
        for fn in (ours, plain):  # warm-up: allocator, kernels, optimizer state
            for _ in range(5):
                fn().item()
        times = {"ds_hydra": [], "plain": []}
        for _ in range(rounds):
            for name, fn in (("ds_hydra", ours), ("plain", plain)):
                start = time.perf_counter()
                for _ in range(steps):
                    loss = fn()
                loss.item()
                times[name].append((time.perf_counter() - start) / steps)
    ours_ms = statistics.median(times["ds_hydra"]) * 1e3
    plain_ms = statistics.median(times["plain"]) * 1e3
    return {"ds_hydra_ms": ours_ms, "plain_ms": plain_ms, "ratio": ours_ms / plain_ms}


def bench_nanogpt(seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "ds_hydra", "experiment=nanogpt_cpu", f"trainer.seed={seed}",
             f"hydra.run.dir={tmp}/run", "trainer.progress=false"],
            cwd=REPO, capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r][-1]
    return {"val_loss": final["val_loss"], "train_loss": final["train_loss"], "step": final["step"], "wall_s": wall}


def _median_wall(cmd, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def _run_timed(cmd) -> tuple:
    """(wall seconds, CPU seconds of the child) of one run of ``cmd``."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


TORCH_ADAMW = "import torch; m = torch.nn.Linear(8, 8); torch.optim.AdamW(m.parameters())"


def bench_startup_run(repeats: int) -> dict:
    """A one-step gpt_tiny run against importing torch and building an AdamW, interleaved."""
    torch_runs, ours_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            torch_runs.append(_run_timed([sys.executable, "-c", TORCH_ADAMW]))
            ours_runs.append(_run_timed([
                sys.executable, "-m", "ds_hydra", "model=gpt_tiny", "trainer.max_steps=1", "trainer.eval_interval=0",
                "trainer.eval_batches=1", "trainer.device=cpu", "trainer.progress=false", f"hydra.run.dir={tmp}/run{i}",
            ]))
    wall = [statistics.median(r[0] for r in runs) for runs in (ours_runs, torch_runs)]
    cpu = [statistics.median(r[1] for r in runs) for runs in (ours_runs, torch_runs)]
    return {"run_s": wall[0], "torch_s": wall[1], "ratio": wall[0] / wall[1],
            "run_cpu_s": cpu[0], "torch_cpu_s": cpu[1], "cpu_ratio": cpu[0] / cpu[1]}


def bench_startup(repeats: int) -> dict:
    torch_s = _median_wall([sys.executable, "-c", "import torch"], repeats)
    cfg_s = _median_wall([sys.executable, "-m", "ds_hydra", "--cfg", "job"], repeats)
    return {"import_torch_s": torch_s, "cfg_job_s": cfg_s, "ratio": cfg_s / torch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=["step", "hf", "nanogpt", "startup", "startup_run"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds for the nanogpt run (mean reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the step benchmarks (0: torch's default); "
                        "1 keeps a shared machine's other work from disturbing the ratio")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    todo = args.only or ["step", "hf", "startup", "startup_run", "nanogpt"]
    print("| benchmark | ds_hydra | reference | ratio | target |")
    print("|---|---|---|---|---|")
    if "step" in todo:
        r = bench_step(args.rounds, args.steps, ["experiment=nanogpt_cpu"])
        print(f"| train step, nanogpt_cpu shape (median of {args.rounds}x{args.steps}) | {r['ds_hydra_ms']:.2f} ms "
              f"| {r['plain_ms']:.2f} ms (plain PyTorch loop) | {r['ratio']:.3f} | <= 1.02 |", flush=True)
    if "hf" in todo:
        r = bench_step(args.rounds, args.steps, ["model=hf_llama"])
        print(f"| train step, model=hf_llama (transformers LlamaForCausalLM, median of {args.rounds}x{args.steps}) "
              f"| {r['ds_hydra_ms']:.2f} ms | {r['plain_ms']:.2f} ms (plain loop, same model) | {r['ratio']:.3f} "
              f"| <= 1.02 |", flush=True)
    if "startup" in todo:
        r = bench_startup(args.repeats)
        print(f"| start-up: `ds-hydra --cfg job` vs `python -c 'import torch'` | {r['cfg_job_s']:.2f} s "
              f"| {r['import_torch_s']:.2f} s | {r['ratio']:.2f} | <= 1.25 |", flush=True)
    if "startup_run" in todo:
        r = bench_startup_run(args.repeats)
        print(f"| start-up: one-step `model=gpt_tiny` run vs `python -c 'import torch; ...AdamW(...)'` (median of "
              f"{args.repeats}, interleaved) | {r['run_s']:.2f} s | {r['torch_s']:.2f} s | {r['ratio']:.2f} | <= 1.3 |")
        print(f"| the same, CPU time (user + sys) | {r['run_cpu_s']:.2f} s | {r['torch_cpu_s']:.2f} s "
              f"| {r['cpu_ratio']:.2f} | <= 1.3 |", flush=True)
    if "nanogpt" in todo:
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = [bench_nanogpt(seed) for seed in seeds]
        val = statistics.mean(r["val_loss"] for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        each = ", ".join(f"{r['val_loss']:.3f}" for r in runs)
        print(f"| experiment=nanogpt_cpu, val loss at step {runs[0]['step']} (seeds {args.seeds}: {each}) | {val:.4f} "
              f"| 1.88 (published), 1.886 (nanoGPT here) | {val / 1.88:.3f} | <= 1.0 |", flush=True)
        print(f"| experiment=nanogpt_cpu, wall time incl. start-up and evals | {wall:.1f} s | ~70 s (nanoGPT here) "
              f"| {wall / 70:.2f} | <= 1.0 |", flush=True)


if __name__ == "__main__":
    main()
