"""GPU benchmarks of ds_hydra in one run, written to one results file (markdown with the raw JSON).

    bench/gpu.sh                                  # a GPU: a few minutes on an H200
    bench/gpu.sh --smoke                          # a tiny model on any machine (CPU too): checks the script
    python bench/gpu_bench.py --out r.md --sections throughput,max_batch

1. throughput: ``experiment=gpt2_124m`` (GPT-2 124M, bf16 autocast, compiled blocks, fused AdamW) at
   one batch size for each activation-checkpointing policy (none, ckpt.segments=4, full, selective,
   and full with model.head_chunk_tokens=8192): tokens/s, MFU, peak memory, and the host syncs of a
   train step (CUDA's sync debug mode).
   Targets: MFU >= 45% without checkpointing; selective costs <= 10% of that throughput.
2. max_batch: the largest batch that fits per policy: a guess from the peak memory at two batch sizes
   (memory grows linearly with the batch), then probes of two steps each, catching out-of-memory,
   until the largest fitting and smallest failing batch are within 3%. Target: full >= 3x none
   (GPT-2's (B, T, 50257) logits and their gradient are a large share of what full checkpointing
   cannot drop: full+head_chunks shows the batch without them).
3. nanogpt: ``python -m ds_hydra experiment=nanogpt_gpu`` (5000 steps) end to end: best and final val
   loss, wall time. Target: val loss <= 1.4697 (nanoGPT's) in less than ~3 minutes.

``--smoke`` swaps in a 4-layer, 32-wide model and a few steps, and on a CPU simulates the memory limit
of the batch search (a fixed number of sequences), so the whole script runs in a minute anywhere.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

NANOGPT_VAL_LOSS = 1.4697  # nanoGPT's Shakespeare-character GPU run (A100, about 3 minutes)
NANOGPT_WALL_S = 180.0

# label -> alternative override lists (the first that composes is used)
POLICIES: Dict[str, List[List[str]]] = {
    "none": [["ckpt=none"]],
    "segments=4": [["ckpt=segments", "ckpt.segments=4"], ["ckpt.segments=4"]],
    "full": [["ckpt=full"], ["ckpt.full=true"]],
    "selective": [["ckpt=selective"], ["ckpt.selective=true"]],
    # full, and the output layer + loss in chunks: the (B, T, 50257) logits are never held
    "full+head_chunks": [["ckpt=full", "model.head_chunk_tokens=8192"], ["ckpt.full=true", "model.head_chunk_tokens=8192"]],
}
SMOKE_MODEL = [
    "model.n_layer=4", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
    "model.vocab_size=512", "data.vocab_size=512", "data.num_tokens=20000",
]
SMOKE_NANOGPT = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=4",
    "trainer.max_steps=20", "trainer.eval_interval=10", "trainer.eval_batches=2", "scheduler.warmup_steps=2",
]
SMOKE_SIMULATED_LIMIT = 24  # sequences that "fit" in a smoke run without a GPU


@dataclass
class Settings:
    smoke: bool
    batch: int
    warmup: int
    steps: int
    max_probes: int
    extra: List[str] = field(default_factory=list)

    @property
    def base(self) -> List[str]:
        model = SMOKE_MODEL if self.smoke else []
        return ["experiment=gpt2_124m", "trainer.progress=false", *model, *self.extra]


# -- helpers ------------------------------------------------------------------------------------
def _cuda(trainer) -> bool:
    return trainer.device.type == "cuda"


def _sync(trainer) -> None:
    import torch

    if _cuda(trainer):
        torch.cuda.synchronize(trainer.device)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def compose_policy(settings: Settings, label: str, *more: str):
    """The composed, validated config of a policy, and the overrides that produced it."""
    from conftest import compose

    from ds_hydra.validation import validate_config

    errors = []
    for overrides in POLICIES[label]:
        try:
            cfg = compose([*settings.base, *overrides, *more])
        except Exception as exc:  # this spelling of the policy does not exist here: try the next
            errors.append(f"{' '.join(overrides)}: {str(exc).splitlines()[0]}")
            continue
        validate_config(cfg)
        return cfg, overrides
    raise RuntimeError("; ".join(errors))


def build_trainer(cfg, run_dir: Path):
    from ds_hydra.training.trainer import Trainer

    return Trainer(cfg, run_dir)


def set_batch(trainer, batch: int) -> None:
    trainer.train_batches.batch_size = batch
    tcfg = trainer.cfg.trainer
    trainer.tokens_per_step = batch * trainer.seq_len * tcfg.grad_accum_steps


def timed_steps(trainer, steps: int) -> float:
    """Seconds per step over ``steps`` steps, synchronized at both ends."""
    _sync(trainer)
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = trainer.train_step()
    loss.item()
    _sync(trainer)
    return (time.perf_counter() - start) / steps


def peak_memory(trainer) -> Optional[int]:
    import torch

    return torch.cuda.max_memory_allocated(trainer.device) if _cuda(trainer) else None


def reset_peak(trainer) -> None:
    import torch

    if _cuda(trainer):
        torch.cuda.reset_peak_memory_stats(trainer.device)


def host_syncs_per_step(trainer, steps: int = 3) -> Optional[float]:
    """Synchronizing CUDA calls per train step, counted by torch's sync debug mode (None off CUDA)."""
    import torch

    if not _cuda(trainer):
        return None
    _sync(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(trainer)
    return sum("synchroniz" in str(w.message).lower() for w in caught) / steps


# -- 1. throughput per policy -------------------------------------------------------------------
def bench_policy(settings: Settings, label: str, run_dir: Path) -> Tuple[dict, object]:
    """Throughput of one policy; returns the row and the trainer (reused by the batch search)."""
    import torch

    cfg, overrides = compose_policy(settings, label, f"trainer.batch_size={settings.batch}")
    started = time.perf_counter()
    trainer = build_trainer(cfg, run_dir)
    for _ in range(settings.warmup):  # compile, allocator and optimizer state
        trainer.train_step()
    _sync(trainer)
    warmup_s = time.perf_counter() - started
    reset_peak(trainer)
    step_s = timed_steps(trainer, settings.steps)
    tokens_per_s = trainer.tokens_per_step / step_s
    row = {
        "policy": label,
        "overrides": " ".join(overrides),
        "batch": settings.batch,
        "tokens_per_s": tokens_per_s,
        "step_ms": step_s * 1e3,
        "mfu": trainer.throughput.mfu(tokens_per_s),
        "peak_memory_gib": (peak_memory(trainer) or 0) / 2**30 if _cuda(trainer) else None,
        "flops_per_token": trainer.throughput.flops_per_token,
        "warmup_s": warmup_s,
        "host_syncs_per_step": host_syncs_per_step(trainer),
        "device": str(trainer.device),
        "precision": str(trainer.autocast_dtype or torch.float32).replace("torch.", ""),
        "compiled": _cuda(trainer) if cfg.trainer.compile is None else bool(cfg.trainer.compile),
    }
    return row, trainer


# -- 2. largest batch per policy ------------------------------------------------------------------
def largest_batch(
    probe: Callable[[int], bool], fits: int, guess: int, max_probes: int = 10, tolerance: float = 0.03
) -> Tuple[int, Optional[int], List[Tuple[int, bool]]]:
    """The largest batch ``b`` with ``probe(b)`` true, given ``probe(fits)`` is true.

    Memory is linear in the batch, so ``guess`` (from two measured points) is usually within a few
    percent. From it: while everything fits, grow by 1/8, then faster (1/4, 1/2, x2) in case the
    guess was low; after the first failure far above the best fit, try 10% lower once, then the
    geometric mean; within 25%, bisect. Stops when the largest fit and the smallest failure are
    within ``tolerance`` (or 1 apart), or after ``max_probes`` probes.
    Returns (largest fit, smallest failure or None, [(batch, fitted), ...] in probe order).
    """
    lo, hi = fits, None
    tried: List[Tuple[int, bool]] = []
    growth = (1.125, 1.25, 1.5, 2.0)
    batch, successes, failures = max(guess, lo + 1), 0, 0
    while len(tried) < max_probes:
        ok = probe(batch)
        tried.append((batch, ok))
        if ok:
            lo, successes = max(lo, batch), successes + 1
        else:
            hi, failures = batch if hi is None else min(hi, batch), failures + 1
        if hi is None:
            batch = max(lo + 1, math.ceil(lo * growth[min(successes, len(growth)) - 1]))
            continue
        if hi - lo <= max(1, int(lo * tolerance)):
            break
        if hi > lo * 1.25:
            batch = int(hi * 0.9) if failures == 1 else int(math.sqrt(lo * hi))
        else:
            batch = (lo + hi) // 2
        batch = min(max(batch, lo + 1), hi - 1)
    return lo, hi, tried


def make_probe(trainer, settings: Settings, log: Callable[[str], None]) -> Callable[[int], bool]:
    """probe(b): two train steps at batch b; False on out-of-memory (or past the smoke limit on CPU)."""
    simulated = settings.smoke and not _cuda(trainer)

    def probe(batch: int) -> bool:
        set_batch(trainer, batch)
        failed = False
        try:
            for _ in range(2):
                trainer.train_step()
            _sync(trainer)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            failed = True
        if failed:  # outside the except block: the traceback no longer pins the step's tensors
            trainer.optimizer.zero_grad(set_to_none=True)
        _free_memory()
        fits = not failed and (batch <= SMOKE_SIMULATED_LIMIT if simulated else True)
        log(f"    batch {batch}: {'fits' if fits else 'out of memory'}")
        return fits

    return probe


def bench_max_batch(trainer, settings: Settings, label: str, log: Callable[[str], None]) -> dict:
    """Largest batch for the policy of ``trainer``: a linear-memory guess, then probes."""
    import torch

    b1, b2 = settings.batch, 2 * settings.batch
    points = []
    for b in (b2, b1):  # b2 first: on CUDA it triggers the batch-dynamic graph both then share
        set_batch(trainer, b)
        for _ in range(2):
            trainer.train_step()
        _sync(trainer)
        reset_peak(trainer)
        trainer.train_step()
        _sync(trainer)
        points.append((b, peak_memory(trainer)))
    (b2, m2), (b1, m1) = points
    if _cuda(trainer):
        capacity = torch.cuda.get_device_properties(trainer.device).total_memory
        per_seq = (m2 - m1) / (b2 - b1)
        fixed = m1 - b1 * per_seq
        guess = int((0.97 * capacity - fixed) / per_seq) if per_seq > 0 else 4 * b2
    else:  # no allocator statistics off CUDA: the smoke run's simulated limit
        capacity, per_seq, fixed, guess = None, None, None, 2 * b2
    best, failed, tried = largest_batch(make_probe(trainer, settings, log), b2, guess, settings.max_probes)
    return {
        "policy": label,
        "max_batch": best,
        "first_failure": failed,
        "guess": guess,
        "bytes_per_sequence": per_seq,
        "fixed_bytes": fixed,
        "capacity_bytes": capacity,
        "probes": tried,
        "simulated_limit": SMOKE_SIMULATED_LIMIT if (settings.smoke and not _cuda(trainer)) else None,
    }


# -- 3. nanogpt_gpu end to end ---------------------------------------------------------------------
def bench_nanogpt(settings: Settings) -> dict:
    import os

    from ds_hydra.training.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = ["experiment=nanogpt_gpu", f"hydra.run.dir={run_dir}", "trainer.progress=false"]
        args += SMOKE_NANOGPT if settings.smoke else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ds_hydra", *args], cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        records = read_metrics(run_dir)
    evals = [r for r in records if "val_loss" in r]
    logs = [r for r in records if "tokens_per_s" in r]
    reached = [r["step"] for r in evals if r["val_loss"] <= NANOGPT_VAL_LOSS]
    return {
        "args": " ".join(args[:1] + args[3:]),
        "steps": evals[-1]["step"],
        "final_val_loss": evals[-1]["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in evals),
        "first_step_at_target": reached[0] if reached else None,
        "wall_s": wall,
        "tokens_per_s_last": logs[-1]["tokens_per_s"] if logs else None,
        "mfu_last": logs[-1].get("mfu") if logs else None,
        "peak_memory_gib": logs[-1].get("peak_memory_gib") if logs else None,
    }


# -- report -----------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    from ds_hydra.training.throughput import lookup_gpu

    env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        entry = lookup_gpu(name)
        env.update(
            device=name,
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            cuda=torch.version.cuda,
            peak_bf16_tflops=entry.bf16 if entry else None,
        )
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return env


def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def render(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = [
        "# ds_hydra GPU benchmark" + (" (SMOKE: tiny model, not a measurement)" if s["smoke"] else ""),
        "",
        f"{env['device']}; torch {env['torch']}; {env['date']}. Command: `{results['command']}`",
        "",
    ]
    rows = results.get("throughput", [])
    if rows:
        base = next((r for r in rows if r.get("policy") == "none" and "tokens_per_s" in r), None)
        lines += [
            f"## 1. Throughput, experiment=gpt2_124m, batch {s['batch']} x {rows[0].get('block_size', '')} tokens, "
            f"{s['steps']} timed steps after {s['warmup']} warm-up",
            "",
            "| policy | tokens/s | vs none | MFU | peak memory GiB | step ms | host syncs/step | warm-up s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['policy']} | error: {r['error']} | | | | | | |")
                continue
            rel = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            lines.append(
                f"| {r['policy']} (`{r['overrides']}`) | {r['tokens_per_s']:,.0f} | {_fmt(rel, '.3f')} | "
                f"{_fmt(r['mfu'], '.1%')} | {_fmt(r['peak_memory_gib'], '.2f')} | {r['step_ms']:.1f} | "
                f"{_fmt(r['host_syncs_per_step'], '.1f')} | {r['warmup_s']:.1f} |"
            )
        lines += ["", "Targets: MFU >= 45% for none; selective >= 0.90 of none's tokens/s.", ""]
    batches = results.get("max_batch", [])
    if batches:
        base = next((r for r in batches if r.get("policy") == "none" and "max_batch" in r), None)
        lines += [
            "## 2. Largest batch that fits (two train steps per probe)",
            "",
            "| policy | max batch | vs none | first failure | linear guess | MiB per sequence | probes |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in batches:
            if "error" in r:
                lines.append(f"| {r['policy']} | error: {r['error']} | | | | | |")
                continue
            rel = r["max_batch"] / base["max_batch"] if base else None
            per_seq = r["bytes_per_sequence"] / 2**20 if r["bytes_per_sequence"] else None
            probes = ", ".join(f"{b}{'' if ok else ' OOM'}" for b, ok in r["probes"])
            lines.append(
                f"| {r['policy']} | {r['max_batch']} | {_fmt(rel, '.2f')} | {_fmt(r['first_failure'], 'd')} | "
                f"{r['guess']} | {_fmt(per_seq, '.1f')} | {probes} |"
            )
        if any(r.get("simulated_limit") for r in batches):
            lines.append(f"\nNo GPU: the memory limit is simulated ({SMOKE_SIMULATED_LIMIT} sequences).")
        lines += ["", "Target: full >= 3x none.", ""]
    nano = results.get("nanogpt")
    if nano:
        lines += ["## 3. experiment=nanogpt_gpu end to end", ""]
        if "error" in nano:
            lines.append(f"error: {nano['error']}")
        else:
            lines += [
                "| steps | best val loss | final val loss | first step <= 1.4697 | wall s | tokens/s | MFU |",
                "|---|---|---|---|---|---|---|",
                f"| {nano['steps']} | {nano['best_val_loss']:.4f} | {nano['final_val_loss']:.4f} | "
                f"{_fmt(nano['first_step_at_target'], 'd')} | {nano['wall_s']:.1f} | "
                f"{_fmt(nano['tokens_per_s_last'], ',.0f')} | {_fmt(nano['mfu_last'], '.1%')} |",
                "",
                f"Target: val loss <= {NANOGPT_VAL_LOSS} (nanoGPT, A100) in less than ~{NANOGPT_WALL_S:.0f} s of wall time.",
            ]
        lines.append("")
    lines += ["## Raw results", "", "```json", json.dumps(results, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks the script on any machine")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.md"), help="results file (markdown)")
    parser.add_argument("--sections", default="throughput,max_batch,nanogpt", help="comma-separated subset")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    parser.add_argument("--batch", type=int, default=None, help="batch for throughput (16; smoke 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (10; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (30; smoke 2)")
    parser.add_argument("--max-probes", type=int, default=10, help="batch-search probes per policy")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for sections 1-2 (e.g. trainer.compile=false)")
    args = parser.parse_args(argv)
    settings = Settings(
        smoke=args.smoke,
        batch=args.batch or (4 if args.smoke else 16),
        warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 10),
        steps=args.steps or (2 if args.smoke else 30),
        max_probes=args.max_probes,
        extra=list(args.overrides),
    )
    sections = set(args.sections.split(","))
    unknown = sections - {"throughput", "max_batch", "nanogpt"} or set(args.policies.split(",")) - set(POLICIES)
    if unknown:
        parser.error(f"unknown section or policy: {', '.join(sorted(unknown))}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "command": " ".join(["bench/gpu.sh", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(),
        "settings": {k: v for k, v in vars(settings).items()},
    }

    def log(message: str) -> None:
        print(message, flush=True)

    def save() -> None:  # after every section, so a run cut short still leaves its numbers
        out.write_text(render(results), encoding="utf-8")

    if sections & {"throughput", "max_batch"}:
        import torch

        results["throughput"], results["max_batch"] = [], []
        for label in args.policies.split(","):
            log(f"policy {label}")
            trainer = None
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row, trainer = bench_policy(settings, label, Path(tmp))
                    row["block_size"] = trainer.seq_len
                    log(f"  {row['tokens_per_s']:,.0f} tokens/s, MFU {_fmt(row['mfu'], '.1%')}, "
                        f"peak {_fmt(row['peak_memory_gib'], '.2f')} GiB")
                    if "throughput" in sections:
                        results["throughput"].append(row)
                    if "max_batch" in sections:
                        result = bench_max_batch(trainer, settings, label, log)
                        log(f"  max batch {result['max_batch']}")
                        results["max_batch"].append(result)
                except Exception as exc:  # record and go on: one broken policy must not lose the rest
                    message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]
                    log(f"  error: {message}")
                    for name in ("throughput", "max_batch"):
                        done = any(r.get("policy") == label for r in results[name])
                        if name in sections and not done:
                            results[name].append({"policy": label, "error": message})
                finally:
                    del trainer
                    _free_memory()
                    torch._dynamo.reset()
            save()
    if "nanogpt" in sections:
        log("experiment=nanogpt_gpu")
        try:
            results["nanogpt"] = bench_nanogpt(settings)
            log(f"  val loss {results['nanogpt']['best_val_loss']:.4f} in {results['nanogpt']['wall_s']:.1f} s")
        except Exception as exc:
            results["nanogpt"] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
        save()
    save()
    log(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
