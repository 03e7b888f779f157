"""Memory preflight benchmark: the estimate of a training step against its measured peak, side by side.

    python bench/memory.py                 # every case below on the CPU (~1 min)
    python bench/memory.py --only full     # the cases whose name contains "full"
    python bench/memory.py --device cuda   # on a GPU (peaks from max_memory_allocated)

For each case the real ``Trainer`` is built from the shipped configs (plus the case's overrides) and
steps twice: the first step creates the optimizer state, the second is measured. measured = the
bytes resident when it starts (parameters and optimizer state, counted tensor by tensor) + the peak
the allocator reaches above them during the step (``torch.profiler`` with ``profile_memory=True`` on
the CPU, as bench/ckpt.py does; ``max_memory_allocated`` on CUDA): forward, loss, backward, clipping,
the optimizer step, zero_grad. estimate = ``judge_step_memory(cfg).estimate.total``, from the config
alone, computed before the Trainer exists (fake tensors: nothing allocated). Target: within 15%.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MiB = 2**20
BASE = ["trainer.device=cpu", "trainer.progress=false", "trainer.compile=false", "run.memory_check=off"]
# name -> overrides (on top of the default config: gpt_small, 4 x 128, T=64, B=12, AdamW, Tiny Shakespeare)
CASES = {
    "gpt_small B=12": [],
    "gpt_small B=64": ["trainer.batch_size=64"],
    "gpt_small B=64 full": ["trainer.batch_size=64", "ckpt=full"],
    "gpt_small B=64 segments=2": ["trainer.batch_size=64", "ckpt=segments", "ckpt.segments=2"],
    "gpt_small B=64 selective": ["trainer.batch_size=64", "ckpt=selective"],
    "gpt_small B=64 budget 50%": ["trainer.batch_size=64", "ckpt=memory_budget", "ckpt.memory_budget=50%"],
    "gpt_small B=32 accum 2": ["trainer.batch_size=32", "trainer.grad_accum_steps=2"],
    "gpt_small B=64 sgd": ["trainer.batch_size=64", "optimizer=sgd"],
    "gpt_small B=64 bf16 autocast": ["trainer.batch_size=64", "trainer.precision=bf16"],
    "nanogpt_char B=8": ["model=nanogpt_char", "trainer.batch_size=8"],
    "nanogpt_char B=8 full": ["model=nanogpt_char", "trainer.batch_size=8", "ckpt=full"],
    "nanogpt_char B=8 every_n=2": ["model=nanogpt_char", "trainer.batch_size=8", "ckpt=every_n", "ckpt.every_n=2"],
    "12x256 T=256 B=8": ["model.n_layer=12", "model.n_embd=256", "model.block_size=256", "trainer.batch_size=8"],
    "vocab 8192 T=256 B=8": ["data=synthetic", "data.vocab_size=8192", "model.block_size=256", "trainer.batch_size=8"],
    "vocab 8192 T=256 B=8 head chunks": ["data=synthetic", "data.vocab_size=8192", "model.block_size=256",
                                         "trainer.batch_size=8", "model.head_chunk_tokens=512"],
}


def resident_bytes(trainer) -> int:
    """Parameters and optimizer state: what lives between steps (gradients are set to None)."""
    import torch

    tensors = {id(p): p for p in trainer.model.parameters()}
    for state in trainer.optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_peak_above(fn, device) -> int:
    """The allocator's peak during ``fn()`` above what was allocated when it started."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure(cfg, run_dir: Path):
    """(the estimate of ``cfg``'s step, the measured peak of its second real step, seconds the estimate took)."""
    from ds_hydra.training.memory_preflight import judge_step_memory
    from ds_hydra.training.trainer import Trainer

    started = time.perf_counter()
    estimate = judge_step_memory(cfg).estimate
    estimate_s = time.perf_counter() - started
    trainer = Trainer(cfg, Path(run_dir))
    trainer.train_step()  # creates the optimizer state
    resident = resident_bytes(trainer)
    peak = step_peak_above(trainer.train_step, trainer.device)
    return estimate, resident + peak, estimate_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run the cases whose name contains this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {k: v for k, v in CASES.items() if not args.only or any(o in k for o in args.only)}
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads")
    header = (f"| case | estimate MiB | measured MiB | error | params+opt MiB | fwd-bwd peak MiB | kept MiB | logits MiB "
              f"| estimate s |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    from conftest import compose

    for name, overrides in cases.items():
        with tempfile.TemporaryDirectory() as run_dir:
            estimate, measured, seconds = measure(compose([*BASE, f"trainer.device={args.device}", *overrides]), run_dir)
        error = estimate.total / measured - 1
        worst = max(worst, abs(error))
        print(f"| {name} | {estimate.total / MiB:.1f} | {measured / MiB:.1f} | {error:+.1%} | "
              f"{(estimate.parameters + estimate.optimizer_state) / MiB:.1f} | {estimate.forward_backward_peak / MiB:.1f} | "
              f"{estimate.kept / MiB:.1f} | {estimate.logits / MiB:.1f} | {seconds:.2f} |", flush=True)
    ok = worst <= 0.15
    print(f"\n[{'ok' if ok else 'MISS'}] every estimate within 15% of the measured step peak (worst {worst:.1%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
