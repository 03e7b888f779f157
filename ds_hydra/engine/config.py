"""Schemas of the ``engine`` config group: how many processes train, and which engine syncs them (torch-free).

* ``auto``: one process, or DDP when launched by ``torchrun`` with more than one process.
* ``ddp``: torch DistributedDataParallel: every rank holds the whole model, gradients are all-reduced.
* ``fsdp``: torch FSDP2 (``fully_shard`` on every block, then the root): parameters, gradients and
  optimizer state sharded across ranks, gathered per block for compute.
* ``deepspeed``: DeepSpeed's engine (optional extra) with ZeRO stages and offload; ds_hydra writes its
  JSON config from this config (``task=export_deepspeed`` writes it without training).

Every engine runs under ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); started without one, ``ddp``, ``fsdp`` and ``deepspeed`` run as a
one-process group. Each rank reads its own share of every global batch, so the effective batch is
``trainer.batch_size x trainer.grad_accum_steps x world size``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from ds_hydra.common.launch_env import multi_process  # reads the environment only: no torch import


class EngineName(Enum):
    auto = "auto"  # one process; DDP when torchrun starts more than one
    ddp = "ddp"  # torch DistributedDataParallel
    fsdp = "fsdp"  # torch FSDP2 (fully_shard)
    deepspeed = "deepspeed"  # DeepSpeed's engine (pip install 'ds-hydra[deepspeed]')


class Offload(Enum):
    none = "none"  # keep it on the GPU
    cpu = "cpu"  # host memory
    nvme = "nvme"  # files under engine.nvme_path


@dataclass
class EngineConfig:
    """Fields every engine has."""

    name: EngineName = EngineName.auto
    """auto, ddp, fsdp or deepspeed."""


@dataclass
class DDPEngineConfig(EngineConfig):
    name: EngineName = EngineName.ddp
    bucket_cap_mb: float = 25.0
    """Gradients are all-reduced in buckets of about this many MiB, overlapping backward."""
    find_unused_parameters: bool = False
    """Allow parameters that get no gradient in a step (costs a graph traversal per step)."""
    gradient_as_bucket_view: bool = True
    """Gradients are views into the all-reduce buckets: one copy less, less memory."""


@dataclass
class AutoEngineConfig(DDPEngineConfig):
    """One process; under torchrun with WORLD_SIZE > 1, DDP with the fields below."""

    name: EngineName = EngineName.auto


@dataclass
class FSDPEngineConfig(EngineConfig):
    name: EngineName = EngineName.fsdp
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for backward
    (ZeRO-3 memory); false keeps them until backward (ZeRO-2-like: more memory, less communication)."""
    mixed_precision: bool = True
    """With trainer.precision bf16 (or auto on CUDA): FSDP gathers parameters in bf16 for compute and
    reduces gradients in fp32 (MixedPrecisionPolicy); the sharded fp32 parameters stay the master copy."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in host memory (CPUOffloadPolicy);
    the optimizer steps on the CPU."""


@dataclass
class DeepSpeedEngineConfig(EngineConfig):
    """DeepSpeed's engine; ds_hydra derives its JSON config (see ``deepspeed_config.deepspeed_config``)."""

    name: EngineName = EngineName.deepspeed
    zero_stage: int = 2
    """ZeRO stage: 0 off, 1 optimizer state sharded, 2 also gradients, 3 also parameters."""
    offload_optimizer: Offload = Offload.none
    """ZeRO-Offload of the optimizer state and step (stage >= 1): none, cpu or nvme."""
    offload_param: Offload = Offload.none
    """ZeRO-Infinity offload of the parameters (stage 3 only): none, cpu or nvme."""
    nvme_path: Optional[str] = None
    """Folder for nvme offload (a fast local disk); needed when an offload is nvme."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    reduce_bucket_size: int = 500_000_000
    """Elements reduced at a time."""
    export_world_size: Optional[int] = None
    """task=export_deepspeed: the world size the file is for (train_batch_size depends on it);
    null: WORLD_SIZE of the launcher, else 1. Training always uses the actual world size."""
    config_file: Optional[str] = None
    """Where task=export_deepspeed writes the JSON; null: <run dir>/deepspeed_config.json."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Merged into the generated JSON last, for DeepSpeed settings ds_hydra does not model
    (e.g. {zero_optimization: {stage3_max_live_parameters: 1e8}}, {fp16: {initial_scale_power: 12}},
    {zero_optimization: {offload_optimizer: {pin_memory: false}}}); it may not set what ds_hydra
    derives from the config (batch sizes, clipping, precision's ``enabled``, optimizer, scheduler, ZeRO
    stage, offload devices)."""


# DeepSpeed JSON keys ds_hydra derives, and the config keys to set instead.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "trainer.batch_size, trainer.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "trainer.batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "gradient_clipping": "trainer.grad_clip",
    "optimizer": "optimizer=...",
    "scheduler": "scheduler=...",
}
DERIVED_ZERO_KEYS = {"stage": "engine.zero_stage"}
# Keys inside sections whose other keys extra may set: (section path, key) -> the config key to set instead.
DERIVED_NESTED_KEYS = {
    ("fp16",): {"enabled": "trainer.precision"},
    ("bf16",): {"enabled": "trainer.precision"},
    ("zero_optimization", "offload_optimizer"): {"device": "engine.offload_optimizer", "nvme_path": "engine.nvme_path"},
    ("zero_optimization", "offload_param"): {"device": "engine.offload_param", "nvme_path": "engine.nvme_path"},
}


# Tasks with nothing to share between processes: under torchrun every rank would write the same files.
# (task=validate and task=import_deepspeed only read the config: under torchrun rank 0 answers for the
# launcher's world size, with no process group, and the other ranks exit: ds_hydra.cli.launch.)
SINGLE_PROCESS_TASKS = ("infer", "eval", "export_deepspeed", "export_hf")


def validate_engine(cfg, trainer=None, task: str = "train", ckpt=None, n_blocks: Optional[int] = None, prefix: str = "engine") -> List[str]:
    """Range and cross-field problems of the engine config (and its interplay with ``trainer`` and ``ckpt``)."""
    problems: List[str] = []
    name = _value(cfg.name)
    precision = _value(trainer.precision) if trainer is not None else None
    if task in SINGLE_PROCESS_TASKS and multi_process():
        problems.append(
            f"task={task}: runs in one process, but a launcher started {os.environ['WORLD_SIZE']}; "
            f"run it without torchrun: python -m ds_hydra task={task} ..."
        )
    if task == "export_deepspeed" and name != "deepspeed":
        problems.append(f"task=export_deepspeed: needs engine=deepspeed (it writes that engine's JSON), got engine={name}")
    if name in ("ddp", "auto") and cfg.get("bucket_cap_mb") is not None and not cfg.bucket_cap_mb > 0:
        problems.append(f"{prefix}.bucket_cap_mb={cfg.bucket_cap_mb}: must be > 0")
    if name == "fsdp" and precision == "fp16":
        problems.append(f"trainer.precision=fp16: not supported with {prefix}=fsdp; use bf16 (or fp32)")
    if name == "fsdp" and ckpt is not None and n_blocks:
        # FSDP shards and gathers each block on its own; a checkpointed segment runs several blocks
        # ahead of the model's own calls, which FSDP's per-block hooks do not follow.
        for key in ("segments", "number_checkpoints"):
            segments = ckpt.get(key) or 0
            if 0 < segments < n_blocks:
                problems.append(
                    f"ckpt.{key}={segments}: segments of several blocks do not work with {prefix}=fsdp; use "
                    f"ckpt.{key}={n_blocks} (one block each), ckpt=full or ckpt=every_n"
                )
    if name == "deepspeed":
        problems += _validate_deepspeed(cfg, prefix)
        if trainer is not None and trainer.get("skip_nonfinite"):
            problems.append(
                f"trainer.skip_nonfinite={trainer.skip_nonfinite}: not with {prefix}=deepspeed (DeepSpeed skips "
                "fp16 overflow steps itself); set it to 0"
            )
    return problems


def _validate_deepspeed(cfg, prefix: str) -> List[str]:
    problems = []
    stage = cfg.zero_stage
    if not 0 <= stage <= 3:
        problems.append(f"{prefix}.zero_stage={stage}: must be 0, 1, 2 or 3")
    offload_optimizer, offload_param = _value(cfg.offload_optimizer), _value(cfg.offload_param)
    if offload_optimizer != "none" and stage < 1:
        problems.append(f"{prefix}.offload_optimizer={offload_optimizer}: needs {prefix}.zero_stage >= 1 (got {stage})")
    if offload_param != "none" and stage != 3:
        problems.append(f"{prefix}.offload_param={offload_param}: needs {prefix}.zero_stage=3 (got {stage})")
    if "nvme" in (offload_optimizer, offload_param) and not cfg.nvme_path:
        problems.append(f"{prefix}.nvme_path: must be set (a folder on a fast local disk) when an offload is nvme")
    if cfg.reduce_bucket_size < 1:
        problems.append(f"{prefix}.reduce_bucket_size={cfg.reduce_bucket_size}: must be >= 1")
    if cfg.export_world_size is not None and cfg.export_world_size < 1:
        problems.append(f"{prefix}.export_world_size={cfg.export_world_size}: must be >= 1, or null")
    extra = cfg.extra or {}
    for key, instead in DERIVED_DEEPSPEED_KEYS.items():
        if key in extra:
            problems.append(f"{prefix}.extra.{key}: derived by ds_hydra; set {instead} instead")
    zero = extra.get("zero_optimization") or {}
    for key, instead in DERIVED_ZERO_KEYS.items():
        if key in zero:
            problems.append(f"{prefix}.extra.zero_optimization.{key}: derived by ds_hydra; set {instead} instead")
    for path, keys in DERIVED_NESTED_KEYS.items():
        section = extra
        for part in path:
            section = section.get(part) if hasattr(section, "get") else None
        if not hasattr(section, "get"):
            continue
        for key, instead in keys.items():
            if key in section:
                problems.append(f"{prefix}.extra.{'.'.join(path)}.{key}: derived by ds_hydra; set {instead} instead")
    return problems


def _value(x):
    return getattr(x, "value", x)
