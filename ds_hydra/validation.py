"""Checks of a composed config that types cannot express; every problem is collected, then raised once.

``config_problems`` is what the CLI and the preflight run before anything is built: each group's
range and cross-field rules, and the optimizer's keys bound to its ``_target_``'s signature (its
schema types only lr and weight decay; every other key is an argument of the optimizer class).
``cross_field_problems`` and ``cross_field_warnings`` see several groups and the machine; ``task=validate``
(ds_hydra.validate_task) adds them and every other ``_target_``'s signature to its report.
"""
from __future__ import annotations

from typing import List

from ds_hydra.activation_checkpointing.config import validate_ckpt
from ds_hydra.data.config import validate_data
from ds_hydra.data.prepare_config import validate_prepare
from ds_hydra.data.tokenizer_config import validate_tokenizer
from ds_hydra.engine.config import validate_engine
from ds_hydra.errors import ConfigError
from ds_hydra.harness.config import validate_lm_eval
from ds_hydra.inference.config import validate_inference
from ds_hydra.instantiate import signature_problems
from ds_hydra.models.adapter_config import validate_adapter
from ds_hydra.models.config import configured_blocks, validate_model
from ds_hydra.optim.config import validate_optimizer, validate_param_groups, validate_scheduler
from ds_hydra.tracking.config import validate_logger
from ds_hydra.training.config import validate_run, validate_trainer


# Tasks that build the optimizer: its keys are checked against the optimizer class (this imports torch).
BUILDS_OPTIMIZER = ("train", "resume", "validate", "export_deepspeed")


def config_problems(cfg) -> List[str]:
    """Every range and cross-field problem of ``cfg``, one message each, naming the key."""
    problems: List[str] = added_key_problems(cfg)  # '+key' additions the schemas do not declare
    problems += validate_model(cfg.model)
    problems += validate_adapter(cfg.get("adapter"), cfg.model, cfg.get("engine", None))
    problems += validate_data(cfg.data)
    if "tokenizer" in cfg:
        problems += validate_tokenizer(cfg.tokenizer)
    if cfg.task.value == "prepare":
        problems += validate_prepare(cfg.prepare)
    problems += validate_trainer(cfg.trainer)
    problems += validate_run(cfg.run) if "run" in cfg else []
    problems += validate_optimizer(cfg.optimizer)
    if cfg.task.value in BUILDS_OPTIMIZER:
        problems += signature_problems(cfg.optimizer, "optimizer")
    problems += validate_param_groups(cfg.param_groups)
    if cfg.trainer.max_steps >= 1:  # else schedule lengths interpolated from it would only echo that problem
        problems += validate_scheduler(cfg.scheduler, max_steps=cfg.trainer.max_steps)
    n_blocks = configured_blocks(cfg.model)
    problems += validate_ckpt(cfg.ckpt, n_blocks=n_blocks)
    problems += validate_inference(cfg.inference, task=cfg.task.value)
    problems += validate_lm_eval(cfg.lm_eval, task=cfg.task.value) if "lm_eval" in cfg else []
    problems += validate_engine(cfg.engine, cfg.trainer, task=cfg.task.value, ckpt=cfg.ckpt, n_blocks=n_blocks)
    problems += validate_logger(cfg.logger, task=cfg.task.value)
    problems += _in_backward_engine_problems(cfg)
    return problems


def added_key_problems(cfg, path: str = "") -> List[str]:
    """Keys of ``cfg`` (any depth) that its schema does not declare: ``+trainer.max_stepz=3`` gets past the
    schema at composition (``+`` adds a key to any node), so it is refused here as the same typo without
    ``+`` is. Nodes without a schema (``model=custom``, a ``Dict`` field such as ``model.config``, whose keys
    their own builder checks) and open schemas (``OPEN_KEYS``) take any key; ``hydra`` is Hydra's."""
    from dataclasses import is_dataclass

    from omegaconf import DictConfig

    from ds_hydra.errors import _dataclass_fields, _did_you_mean

    problems: List[str] = []
    schema = cfg._metadata.object_type
    closed = is_dataclass(schema) and not getattr(schema, "OPEN_KEYS", None)
    declared = set(getattr(schema, "__dataclass_fields__", {})) if closed else set()
    for key in cfg.keys():
        key = str(key)
        where = f"{path}.{key}" if path else key
        if where == "hydra":
            continue
        if closed and key not in declared:
            allowed = _dataclass_fields(schema)
            problems.append(f"{where}: unknown key{_did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}")
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing() and not child._is_interpolation():
            problems += added_key_problems(child, where)
    return problems


def _in_backward_engine_problems(cfg) -> List[str]:
    engine_name = enum_value((cfg.get("engine", None) or {}).get("name", "auto"))
    if cfg.trainer.get("optimizer_in_backward", False) and engine_name in ("ddp", "fsdp", "deepspeed"):
        return [f"trainer.optimizer_in_backward=true: not with engine={engine_name} (gradients are reduced or sharded across "
                f"processes before a step); use engine=auto with one process, or set it false"]
    return []


def validate_config(cfg) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)


def enum_value(value) -> str:
    return str(getattr(value, "value", value))


def wants_cuda(cfg) -> bool:
    """Whether the run's device is CUDA (``auto`` counts as CUDA only where CUDA is present)."""
    device = str(cfg.trainer.device)
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def cross_field_problems(cfg) -> List[str]:
    """Rules between groups that no single group's validator can see."""
    import torch

    problems: List[str] = []
    device = str(cfg.trainer.device)
    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        problems.append(f"trainer.device={device}: CUDA is not available on this machine (use auto or cpu)")
    on_cuda = wants_cuda(cfg) and cuda
    runs_on = f"trainer.device={device} runs on the CPU" if cuda or not device.startswith("cuda") else "this machine has no CUDA"
    if enum_value(cfg.trainer.get("precision", "auto")) == "fp16" and not on_cuda:
        problems.append(f"trainer.precision=fp16: needs a CUDA device ({runs_on}); use fp32 or bf16")
    engine = cfg.get("engine", None) or {}
    for key in ("offload_optimizer", "offload_param"):
        value = enum_value(engine.get(key, "none"))
        if value not in ("none", "None") and not on_cuda:
            problems.append(
                f"engine.{key}={value}: offloading moves state off a GPU, so it needs CUDA "
                f"({runs_on}); set engine.{key}=none"
            )
    if engine.get("cpu_offload", False) and not on_cuda:
        problems.append(
            f"engine.cpu_offload=true: offloading moves state off a GPU, so it needs CUDA "
            f"({runs_on}); set engine.cpu_offload=false"
        )
    return problems


def cross_field_warnings(cfg) -> List[str]:
    """Legal but probably unintended combinations (printed; they do not fail validation)."""
    warnings: List[str] = []
    max_steps = int(cfg.trainer.max_steps)
    for key in ("total_steps", "total_num_steps"):
        total = cfg.scheduler.get(key, None)
        if isinstance(total, int) and total > max_steps:
            warnings.append(
                f"scheduler.{key}={total} > trainer.max_steps={max_steps}: the run stops at "
                f"{100 * max_steps / total:.0f}% of the schedule, above its final lr"
            )
        elif isinstance(total, int) and 0 < total < max_steps:
            warnings.append(
                f"scheduler.{key}={total} < trainer.max_steps={max_steps}: the last {max_steps - total} steps "
                f"run at the schedule's final lr"
            )
    if cfg.ckpt.get("offload", False) and not wants_cuda(cfg):
        warnings.append("ckpt.offload=true: moves saved activations to host memory on CUDA only; on the CPU it does nothing")
    return warnings
