"""Schemas of the ``trainer`` and ``run`` config groups (torch-free); ``logger`` is in ds_hydra.tracking.config."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional


class CheckpointFormat(Enum):
    auto = "auto"  # dcp with engine=ddp or fsdp; full in one process; DeepSpeed's own with engine=deepspeed
    full = "full"  # checkpoints/step_N.pt: one file, the whole state gathered to rank 0
    dcp = "dcp"  # checkpoints/step_N/: torch.distributed.checkpoint, every rank writes its own shards


class Precision(Enum):
    auto = "auto"  # bf16 autocast on CUDA (fp16 before Ampere, which lacks bf16), fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16; parameters and optimizer state stay fp32
    fp16 = "fp16"  # autocast to float16 with a gradient scaler (CUDA only)


@dataclass
class ProfileConfig:
    """torch.profiler over a few training steps (README "Profiling"); outputs in <run dir>/profile/."""

    enabled: bool = False
    """Profile the steps the schedule below picks: a Chrome trace per rank, the top operators in the log,
    a memory timeline."""
    wait: int = 1
    """Steps skipped before each profiling window (the first steps pay for warm-up and allocation)."""
    warmup: int = 1
    """Steps traced but discarded before each window (the profiler's own start-up cost)."""
    active: int = 3
    """Steps recorded in each window: one trace, one table and one memory timeline per window."""
    repeat: int = 1
    """Windows of wait + warmup + active steps (0: repeat until the run ends)."""
    top_ops: int = 15
    """Rows of the log's table of operators by self time (CUDA time on a GPU, CPU time elsewhere)."""
    memory_timeline: bool = True
    """Write memory_timeline_rank<r>_step<n>.html (memory by category over the window; records stacks, which
    slows the profiled steps)."""
    oom_snapshot: bool = False
    """CUDA: record the allocator's history from the first step, and when a step runs out of memory write
    oom_snapshot_rank<r>.pickle (https://pytorch.org/memory_viz) before the one-line error. Works without enabled."""


@dataclass
class TrainerConfig:
    max_steps: int = 2000
    """Optimizer steps to train for."""
    batch_size: Any = 12
    """Sequences per micro-batch (per process), or ``auto``: the largest micro-batch whose estimated step
    fits ``memory_limit``, with ``grad_accum_steps`` set so that ``global_batch_size`` is kept (chosen from
    the memory estimate before the run starts, logged, and written into config_resolved.yaml: a resume
    repeats the choice)."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all processes (batch_size x grad_accum_steps x world size); needed
    by batch_size=auto, which keeps it; with a number batch_size it must equal that product (null: not checked)."""
    memory_limit: Optional[str] = None
    """What batch_size=auto and ckpt=auto fit a step into, and what the memory preflight then refuses to
    exceed: bytes (17179869184) or a size (16GiB, 500MB); null: the device's free memory less the
    estimate's 15% margin."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. The step's loss is the mean over all its label tokens (every
    micro-batch, every rank), so a split of the same global batch computes the same step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value before each step (0 disables clipping)."""
    eval_interval: int = 250
    """Estimate train and validation loss every this many steps (and at the end; 0: only at the end)."""
    eval_batches: int = 50
    """Random batches of each loss estimate (token-weighted: the mean over their label tokens). data=sft
    evaluates val_loss over every validation example instead."""
    log_interval: int = 10
    """Log loss, lr and throughput every this many steps."""
    seed: int = 1337
    """Seeds parameter init, dropout, the batch sampler and the Python and NumPy generators: same seed, same run."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    precision: Precision = Precision.auto
    """auto, fp32, bf16 or fp16."""
    compile: Optional[bool] = None
    """torch.compile each block and the loss; null: on for CUDA, off for CPU."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device at the run's precision, the denominator of MFU; null: looked up
    from the GPU's name (ds_hydra.training.throughput.PEAK_TFLOPS); unknown GPUs and CPUs log no MFU."""
    save_every: int = 0
    """Write a resumable checkpoint every this many steps (0: only the final one)."""
    keep_last: int = 2
    """Resumable checkpoints kept on disk (older ones are deleted once a newer one is safely written)."""
    checkpoint_format: CheckpointFormat = CheckpointFormat.auto
    """auto, full or dcp. full: checkpoints/step_N.pt, one file holding the whole state, gathered to rank 0
    (every rank waits while it writes). dcp: checkpoints/step_N/, torch.distributed.checkpoint: every rank
    writes its own shards of model and optimizer state (no gather), the trainer's state beside them; it
    resumes on any number of ranks and engine (ddp, fsdp, one process). auto: dcp with engine=ddp or fsdp,
    full in one process. engine=deepspeed always writes DeepSpeed's own checkpoint (its save_checkpoint)
    beside a full step_N.pt. An adapter run's checkpoints hold its trainable parameters and their optimizer
    state alone, in either format. Convert with python -m ds_hydra.training.checkpoint_convert."""
    async_checkpoint: bool = False
    """dcp only: a save returns once the state is copied to CPU memory and the shards are written in the
    background while training goes on (at most one save in flight; the next save, the end of the run and
    a stop signal wait for it). A crash during the write leaves the previous checkpoint as the newest. The
    CPU copy is kept between saves (allocated at the first, refilled by each later one; pinned with CUDA):
    this rank's share of model and optimizer state, held in host memory for the whole run. An optimizer
    state no copy can be made of (torchao's 4-bit and 8-bit optimizers) is written in the foreground."""
    skip_nonfinite: int = 0
    """Steps whose loss is NaN or inf that may skip their update before the run stops (0: stop at the first).
    Above 0 the loss is read on the host every step, before the optimizer steps (a sync per step on GPU)."""
    progress: bool = True
    """Show a progress bar on a terminal (plain log lines otherwise)."""
    optimizer_in_backward: bool = False
    """Step each parameter inside backward, as soon as its gradient is ready, and free that gradient at
    once (one optimizer per parameter, torchtune's optimizer_in_bwd): gradients never all exist at once.
    Needs grad_accum_steps=1, grad_clip=0 (no global norm), skip_nonfinite=0, no fp16 and one process."""
    init_from: Optional[str] = None
    """A trained run's directory (its newest checkpoint) or one of its checkpoints/step_N.pt: start from its
    model weights only (fine-tuning): optimizer, schedule, data and step start afresh."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler traces, top operators and memory timelines of a few steps; a memory snapshot on CUDA OOM."""


def _batch_problems(cfg, prefix: str) -> List[str]:
    batch, total = cfg.batch_size, cfg.get("global_batch_size", None)
    problems = []
    if total is not None and total < 1:
        problems.append(f"{prefix}.global_batch_size={total}: must be >= 1, or null")
    if batch == "auto":
        if total is None:
            problems.append(f"{prefix}.batch_size=auto: needs {prefix}.global_batch_size=<sequences per optimizer step>, which it keeps")
    elif isinstance(batch, bool) or not isinstance(batch, int):
        problems.append(f"{prefix}.batch_size={batch}: must be a number of sequences (>= 1) or auto")
    elif batch < 1:
        problems.append(f"{prefix}.batch_size={batch}: must be >= 1")
    limit = cfg.get("memory_limit", None)
    if limit is not None:
        try:
            parse_memory_limit(limit, f"{prefix}.memory_limit")
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def parse_memory_limit(value, key: str = "trainer.memory_limit") -> int:
    """``16GiB`` -> bytes; ValueError naming ``key`` for anything but bytes or a size."""
    from ds_hydra.activation_checkpointing.config import parse_budget

    kind, amount = parse_budget(value, key)
    if kind != "bytes":
        raise ValueError(f"{key}={value}: must be bytes or a size such as 16GiB or 500MB (not a share), or null (free memory)")
    return int(amount)


class MemoryCheck(Enum):
    refuse = "refuse"  # refuse a step far over the device's free memory, warn when close
    warn = "warn"  # only warn, however far over
    off = "off"  # no estimate at all


@dataclass
class RunConfig:
    """How a run owns its directory and what is checked before it starts (README "Outputs")."""

    lock_stale_after_s: float = 600.0
    """A run dir's lock (run.lock) whose holder has not refreshed it for this many seconds is taken over,
    even when the holder is on another host (shared filesystems); the holder refreshes it every
    min(30, this / 4) seconds. On the holder's own host a dead holder is detected at once. 0: never by age."""
    break_lock: bool = False
    """Take over the run dir's lock whoever holds it, for a holder on another host that you know is gone
    (a crashed node). Applies to this command only: a later resume= does not inherit it."""
    memory_check: MemoryCheck = MemoryCheck.refuse
    """Before anything heavy is built, estimate the memory of one training step (parameters, gradients,
    optimizer state, activations under the ckpt policy, logits) and compare it with the device's free
    memory: refuse (exit 2) when even 15% less would not fit, warn when within 15% of it (refuse);
    warn in both cases (warn); skip it (off). task=validate prints the estimate."""


def validate_run(cfg, prefix: str = "run") -> List[str]:
    if cfg.lock_stale_after_s < 0:
        return [f"{prefix}.lock_stale_after_s={cfg.lock_stale_after_s}: must be >= 0 (0: a lock never goes stale by age)"]
    return []


def validate_trainer(cfg, prefix: str = "trainer") -> List[str]:
    problems = []
    for key in ("max_steps", "grad_accum_steps", "eval_batches", "log_interval", "keep_last"):
        if cfg[key] < 1:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 1")
    problems += _batch_problems(cfg, prefix)
    if cfg.get("optimizer_in_backward", False):
        needs = [(cfg.grad_accum_steps > 1, f"grad_accum_steps={cfg.grad_accum_steps}", "grad_accum_steps=1 (each micro-batch would step)"),
                 (cfg.grad_clip > 0, f"grad_clip={cfg.grad_clip}", "grad_clip=0 (the global norm exists only once every gradient does)"),
                 (cfg.skip_nonfinite > 0, f"skip_nonfinite={cfg.skip_nonfinite}", "skip_nonfinite=0 (the update happens before the loss is checked)"),
                 (getattr(cfg.precision, "value", cfg.precision) == "fp16", "precision=fp16", "bf16 or fp32 (fp16 loss scaling unscales every gradient first)")]
        for bad, have, fix in needs:
            if bad:
                problems.append(f"{prefix}.optimizer_in_backward=true: not with {prefix}.{have}; set {prefix}.{fix}")
    for key in ("eval_interval", "save_every", "skip_nonfinite"):
        if cfg[key] < 0:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 0 (0 disables it)")
    profile = cfg.get("profile")
    if profile is not None:
        for key in ("wait", "warmup", "repeat"):
            if profile[key] < 0:
                problems.append(f"{prefix}.profile.{key}={profile[key]}: must be >= 0")
        for key in ("active", "top_ops"):
            if profile[key] < 1:
                problems.append(f"{prefix}.profile.{key}={profile[key]}: must be >= 1")
    if cfg.grad_clip < 0:
        problems.append(f"{prefix}.grad_clip={cfg.grad_clip}: must be >= 0 (0 disables clipping)")
    if cfg.get("peak_tflops") is not None and not cfg.peak_tflops > 0:
        problems.append(f"{prefix}.peak_tflops={cfg.peak_tflops}: must be > 0, or null to look it up from the GPU name")
    device = cfg.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        problems.append(f"{prefix}.device={device}: allowed values: auto, cpu, cuda, cuda:N")
    precision = getattr(cfg.precision, "value", cfg.precision)
    fmt = getattr(cfg.get("checkpoint_format", "auto"), "value", cfg.get("checkpoint_format", "auto"))
    if cfg.get("async_checkpoint") and fmt == "full":
        problems.append(
            f"{prefix}.async_checkpoint=true: needs {prefix}.checkpoint_format=dcp (a full checkpoint is one file "
            f"gathered to rank 0 and written while every rank waits)"
        )
    if device == "cpu" and precision == "fp16":
        problems.append(f"{prefix}.precision=fp16: needs CUDA, but {prefix}.device=cpu; use fp32 or bf16 on the CPU")
    return problems
