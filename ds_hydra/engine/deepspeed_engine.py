"""``engine=deepspeed``: DeepSpeed's engine (ZeRO stages, offload) driven by the Hydra config.

ds_hydra writes DeepSpeed's JSON config from its own config (``deepspeed_config``) and hands DeepSpeed
its optimizer and scheduler as callables::

    deepspeed.initialize(model=model, model_parameters=<ds_hydra's param groups>,
                         optimizer=<optimizer callable>, lr_scheduler=<scheduler callable>, config=<dict>)

How the config maps (DeepSpeed key <- ds_hydra key):

* ``train_micro_batch_size_per_gpu`` <- ``trainer.batch_size``; ``gradient_accumulation_steps`` <-
  ``trainer.grad_accum_steps``; ``train_batch_size`` = their product x world size (DeepSpeed checks
  exactly this equation);
* ``gradient_clipping`` <- ``trainer.grad_clip`` (0: off);
* ``bf16``/``fp16`` <- ``trainer.precision`` (auto: bf16 on a bf16-capable GPU, fp16 on older ones,
  fp32 on the CPU); DeepSpeed then keeps fp32 master weights and, for fp16, scales the loss;
* ``zero_optimization`` <- ``engine.zero_stage``, ``engine.offload_*`` and the other engine keys;
* ``activation_checkpointing`` <- ``ckpt``, every key (for the record: DeepSpeed's engine only uses that section
  in models that call ``deepspeed.checkpointing``; ds_hydra applies activation checkpointing itself,
  in ``prepare_model``, before DeepSpeed wraps the model);
* ``engine.extra`` is merged last, for DeepSpeed keys ds_hydra does not model.

``task=export_deepspeed`` writes that JSON without training (``export_deepspeed``), adding the
``optimizer`` and ``scheduler`` sections DeepSpeed would build the same optimizer and schedule from, and
``steps_per_print`` = ``trainer.log_interval``; ``deepspeed_config=<file>`` reads such a file back
(``deepspeed_import``). Checkpoints: rank 0
writes ``checkpoints/step_N.pt`` whose ``model`` entry is the full model in fp32 (loadable by one
process, with no DeepSpeed), and every rank writes DeepSpeed's own checkpoint (ZeRO shards, fp32 master
weights, optimizer state) under ``checkpoints/deepspeed/step_N``, from which training resumes.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["deepspeed_config", "export_deepspeed", "import_deepspeed", "initialize", "DEEPSPEED_CONFIG_FILE"]

DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
DEEPSPEED_CHECKPOINT_DIR = "deepspeed"  # under <run dir>/checkpoints
_NO_PRINT = 2**31 - 1  # DeepSpeed's own periodic step print: off (ds_hydra logs the run)


# -- the JSON config ------------------------------------------------------------------------------
def deepspeed_config(cfg, world_size: int, precision: str, for_file: bool = False) -> Dict[str, Any]:
    """DeepSpeed's config dict for this run; ``precision`` is resolved (fp32, bf16 or fp16). ``for_file``
    (task=export_deepspeed): also the optimizer and scheduler sections (training hands DeepSpeed callables
    instead) and ``steps_per_print`` = ``trainer.log_interval`` (training turns DeepSpeed's prints off)."""
    from omegaconf import OmegaConf

    tcfg, ecfg = cfg.trainer, cfg.engine
    micro, accum = int(tcfg.batch_size), int(tcfg.grad_accum_steps)
    zero: Dict[str, Any] = {
        "stage": int(ecfg.zero_stage),
        "overlap_comm": bool(ecfg.overlap_comm),
        "contiguous_gradients": bool(ecfg.contiguous_gradients),
        "reduce_bucket_size": int(ecfg.reduce_bucket_size),
    }
    for key in ("offload_optimizer", "offload_param"):
        where = _value(ecfg[key])
        if where != "none":
            zero[key] = {"device": where, "pin_memory": True}
            if where == "nvme":
                zero[key]["nvme_path"] = str(ecfg.nvme_path)
    config: Dict[str, Any] = {
        "train_batch_size": micro * accum * int(world_size),
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(tcfg.grad_clip),
        "bf16": {"enabled": precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0), DeepSpeed's defaults written out
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1} if precision == "fp16" else {"enabled": False},
        "zero_optimization": zero,
        "activation_checkpointing": _activation_checkpointing_section(cfg),
        "steps_per_print": int(tcfg.log_interval) if for_file else _NO_PRINT,
        "wall_clock_breakdown": False,
    }
    if for_file:
        config.update(optimizer_and_scheduler_sections(cfg))
    if _value(ecfg.offload_optimizer) != "none":
        # ds_hydra passes a torch optimizer; DeepSpeed otherwise insists on its own CPU Adam here.
        config["zero_force_ds_cpu_optimizer"] = False
    extra = OmegaConf.to_container(ecfg.extra, resolve=True) if not isinstance(ecfg.extra, dict) else ecfg.extra
    return _deep_merge(config, extra or {})


def _activation_checkpointing_section(cfg) -> Dict[str, Any]:
    ckpt = cfg.ckpt
    number = ckpt.get("number_checkpoints") or ckpt.get("segments") or None
    if not number and ckpt.get("full"):
        number = int(cfg.model.n_layer)
    return {
        "partition_activations": bool(ckpt.get("partition_activations", False)),
        "cpu_checkpointing": bool(ckpt.get("offload", False) or ckpt.get("cpu_checkpointing", False)),
        "contiguous_memory_optimization": bool(ckpt.get("contiguous_memory_optimization", False)),
        "number_checkpoints": int(number) if number else None,
        "synchronize_checkpoint_boundary": bool(ckpt.get("synchronize_checkpoint_boundary", False)),
        "profile": bool(ckpt.get("profile", False)),
    }


# ds_hydra optimizer _target_ -> DeepSpeed's type name. Adam and AdamW become DeepSpeed's fused Adam, which
# takes only these params unless "torch_adam" asks for torch's class (which takes the rest).
DEEPSPEED_OPTIMIZER_NAMES = {
    "torch.optim.Adam": "Adam", "torch.optim.AdamW": "AdamW", "torch.optim.Adagrad": "Adagrad",
    "torch.optim.SGD": "SGD", "torch.optim.RMSprop": "RMSprop", "torch.optim.Adamax": "Adamax",
    "torch.optim.NAdam": "NAdam", "torch.optim.RAdam": "RAdam",
}
FUSED_ADAM_PARAMS = ("lr", "betas", "eps", "weight_decay")
DEEPSPEED_SCHEDULER_NAMES = {
    "ds_hydra.optim.lr_schedules.WarmupLR": "WarmupLR", "ds_hydra.optim.lr_schedules.WarmupDecayLR": "WarmupDecayLR",
    "ds_hydra.optim.lr_schedules.WarmupCosineLR": "WarmupCosineLR", "ds_hydra.optim.lr_schedules.OneCycle": "OneCycle",
    "ds_hydra.optim.lr_schedules.LRRangeTest": "LRRangeTest",
}


def optimizer_and_scheduler_sections(cfg) -> Dict[str, Any]:
    """DeepSpeed's ``optimizer`` and ``scheduler`` sections for the config's optimizer and schedule (what
    DeepSpeed builds from them is what ds_hydra trains with); a schedule DeepSpeed lacks is left out."""
    from omegaconf import OmegaConf

    sections: Dict[str, Any] = {}
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    name = DEEPSPEED_OPTIMIZER_NAMES.get(optimizer.pop("_target_", None))
    optimizer.pop("_partial_", None)
    if name is not None:
        params = {k: _value(v) for k, v in optimizer.items() if v is not None}
        if name in ("Adam", "AdamW"):
            params = _adam_params(name, params)
        sections["optimizer"] = {"type": name, "params": params}
    scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True)
    name = DEEPSPEED_SCHEDULER_NAMES.get(scheduler.pop("_target_", None))
    scheduler.pop("_partial_", None)
    if name is not None:
        sections["scheduler"] = {"type": name, "params": {k: _value(v) for k, v in scheduler.items()}}
    else:
        log.info("scheduler %s has no DeepSpeed type: the file has no scheduler section", cfg.scheduler._target_)
    return sections


def _adam_params(name: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """torch's Adam/AdamW arguments as DeepSpeed's Adam params: ``adam_w_mode`` says which (DeepSpeed's
    Adam is AdamW unless it is false); options the fused kernel lacks ask for torch's class."""
    decoupled = name == "AdamW" or bool(params.pop("decoupled_weight_decay", False))
    out = {k: params[k] for k in FUSED_ADAM_PARAMS if k in params}
    torch_only = {k: v for k, v in params.items() if k not in FUSED_ADAM_PARAMS and v is not False and v is not None}
    if name == "Adam":
        out["adam_w_mode"] = decoupled
    if torch_only:
        out.update(torch_only, torch_adam=True)
    return out


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def export_precision(cfg) -> str:
    """trainer.precision for the file: fp32, bf16 or fp16 as set; auto as this machine resolves it
    (bf16 on a recent GPU, fp16 on an older one, fp32 without one), so set it for another machine."""
    from ds_hydra.devices import resolve_device
    from ds_hydra.training.trainer import resolve_precision

    name = _value(cfg.trainer.precision)
    if name != "auto":
        return name
    dtype = resolve_precision("auto", resolve_device(cfg.trainer.device))
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def export_deepspeed(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``task=export_deepspeed``: write DeepSpeed's JSON config for this config; train nothing."""
    from ds_hydra.engine.distributed import env_world_size
    from ds_hydra.training.run_dir import resolve_run_dir

    ecfg = cfg.engine
    world = int(ecfg.export_world_size or env_world_size())
    precision = export_precision(cfg)
    config = deepspeed_config(cfg, world, precision, for_file=True)
    if ecfg.config_file:
        path = Path(ecfg.config_file)
    else:
        path = resolve_run_dir(run_dir) / DEEPSPEED_CONFIG_FILE
    from ds_hydra.engine.distributed import is_main_process

    try:
        if is_main_process():  # under a launcher: one writer
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"engine.config_file={path}: cannot write it ({exc.strerror})") from None
    log.info(
        "wrote %s: train_batch_size %d = micro-batch %d x accumulation %d x world size %d; ZeRO stage %d; %s",
        path, config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"], world, config["zero_optimization"]["stage"], precision,
    )
    return {"deepspeed_config": str(path), "train_batch_size": config["train_batch_size"], "world_size": world}


# -- training -------------------------------------------------------------------------------------
def import_deepspeed(device: torch.device):
    """``import deepspeed``, on the CPU accelerator when the run is on the CPU."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise UserError(
            f"engine=deepspeed: needs the deepspeed package ({exc}); pip install 'ds-hydra[deepspeed]' "
            "(DS_BUILD_OPS=0 needs no CUDA toolchain)"
        ) from None
    return deepspeed


def initialize(model: nn.Module, cfg, distributed, precision: str) -> Tuple[nn.Module, Any, Any]:
    """``deepspeed.initialize`` with ds_hydra's param groups, optimizer and scheduler callables;
    returns (engine, optimizer, scheduler). The process group must exist (``setup_distributed``)."""
    from ds_hydra.optim.build import log_param_groups, optimizer_callable, param_groups_for, scheduler_callable

    deepspeed = import_deepspeed(distributed.device)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it; launchers set it, a lone process has 0
    config = deepspeed_config(cfg, distributed.world_size, precision)
    offloaded = _value(cfg.engine.offload_optimizer) != "none"
    # Fused/foreach kernels are chosen for the device the optimizer steps on (the CPU when offloaded).
    factory = optimizer_callable(cfg.optimizer, None if offloaded else distributed.device)
    groups = param_groups_for(model, cfg.optimizer, cfg.get("param_groups"))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=factory,
        lr_scheduler=scheduler_callable(cfg.scheduler),
        config=config,
        dist_init_required=False,
    )
    log.info(
        "deepspeed: ZeRO stage %d, %s, train_batch_size %d (micro-batch %d x accumulation %d x %d ranks)",
        config["zero_optimization"]["stage"], precision, config["train_batch_size"],
        config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], distributed.world_size,
    )
    log_param_groups(optimizer)
    return engine, optimizer, scheduler


def train_step(engine, batches, accum: int, device: torch.device, autocast) -> torch.Tensor:
    """One optimizer step of ``accum`` micro-batches; DeepSpeed divides each loss by ``accum``, reduces,
    clips and steps the optimizer and the scheduler at the last one. Returns the mean loss (on device)."""
    engine.train()
    total = torch.zeros((), device=device)
    for _ in range(accum):
        x, y = batches.next_batch(device)
        with autocast():
            loss = engine(x, y)[1]
        engine.backward(loss)
        engine.step()
        total += loss.detach().float() / accum
    return total


# -- checkpoints ----------------------------------------------------------------------------------
def full_model_state_dict(engine, is_main: bool) -> Dict[str, torch.Tensor]:
    """The whole model in fp32 on the CPU (rank 0; empty elsewhere): ZeRO-3 gathers its shards."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if not is_main:
            return {}
        return {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in module.state_dict().items()
        }


def checkpoint_tag(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(engine, run_dir: Path, step: int) -> str:
    """DeepSpeed's own checkpoint (every rank writes its shards); returns its tag."""
    from ds_hydra.training.state import CHECKPOINT_DIR

    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_CHECKPOINT_DIR), tag=tag, save_latest=False)
    return tag


def load_checkpoint(engine, run_dir: Path, tag: str) -> None:
    """Model, fp32 master weights, optimizer and scheduler state from DeepSpeed's checkpoint ``tag``."""
    from ds_hydra.training.state import CHECKPOINT_DIR

    folder = Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_CHECKPOINT_DIR
    if not (folder / tag).is_dir():
        raise UserError(f"{folder / tag}: DeepSpeed checkpoint missing (engine=deepspeed resumes from it)")
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{folder / tag}: DeepSpeed could not load this checkpoint")


def prune_checkpoints(run_dir: Path) -> None:
    """Delete DeepSpeed checkpoints whose ``step_N.pt`` has been pruned (rank 0)."""
    from ds_hydra.training.state import CHECKPOINT_DIR, list_checkpoints

    folder = Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_CHECKPOINT_DIR
    if not folder.is_dir():
        return
    kept = {p.stem for p in list_checkpoints(run_dir)}
    for tag_dir in folder.iterdir():
        if tag_dir.is_dir() and tag_dir.name.startswith("step_") and tag_dir.name not in kept:
            shutil.rmtree(tag_dir, ignore_errors=True)


def _value(x):
    return getattr(x, "value", x)
