"""DeepSpeed's JSON config, derived from ds_hydra's config (``engine=deepspeed``, ``task=export_deepspeed``).

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
(``json_import``). The engine itself is ``ds_hydra.engine.deepspeed_engine``.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from ds_hydra.deepspeed.activation_checkpointing_config import translate as translate_checkpointing_keys
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["deepspeed_config", "deepspeed_json", "export_deepspeed", "DEEPSPEED_CONFIG_FILE"]

DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
_NO_PRINT = 2**31 - 1  # DeepSpeed's own periodic step print: off (ds_hydra logs the run)


# -- the JSON config ------------------------------------------------------------------------------
def deepspeed_config(cfg, world_size: int, precision: str, n_blocks: Optional[int] = None, for_file: bool = False) -> Dict[str, Any]:
    """DeepSpeed's config dict for the run config ``cfg``; ``precision`` is resolved (fp32, bf16 or fp16);
    ``n_blocks`` (the model's block count, when known) gives ``ckpt.full`` its ``number_checkpoints``.
    ``for_file`` (task=export_deepspeed): also the optimizer and scheduler sections (training hands DeepSpeed
    callables instead) and ``steps_per_print`` = ``trainer.log_interval`` (training turns DeepSpeed's
    prints off). Cuts the slices ``deepspeed_json`` takes."""
    tcfg = cfg.trainer
    return deepspeed_json(
        cfg.engine, cfg.ckpt, batch_size=int(tcfg.batch_size), grad_accum_steps=int(tcfg.grad_accum_steps),
        grad_clip=float(tcfg.grad_clip), world_size=world_size, precision=precision, n_blocks=n_blocks,
        steps_per_print=int(tcfg.log_interval) if for_file else None,
        sections=optimizer_and_scheduler_sections(cfg.optimizer, cfg.scheduler) if for_file else None,
    )


def deepspeed_json(
    engine_cfg, ckpt_cfg, *, batch_size: int, grad_accum_steps: int, grad_clip: float, world_size: int, precision: str,
    n_blocks: Optional[int] = None, steps_per_print: Optional[int] = None, sections: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """DeepSpeed's config dict from the ``engine`` config (ZeRO, offload, ``extra``), the ``ckpt`` config
    (the ``activation_checkpointing`` section) and the shape of a step: ``batch_size`` sequences per
    micro-batch, ``grad_accum_steps`` micro-batches, ``world_size`` ranks, gradients clipped to ``grad_clip``.
    ``steps_per_print``: DeepSpeed's own periodic print (None: off); ``sections`` (the optimizer and
    scheduler of a written file) go in before ``engine.extra`` is merged."""
    from omegaconf import OmegaConf

    ecfg = engine_cfg
    micro, accum = int(batch_size), int(grad_accum_steps)
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
        "gradient_clipping": float(grad_clip),
        "bf16": {"enabled": precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0), DeepSpeed's defaults written out
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1} if precision == "fp16" else {"enabled": False},
        "zero_optimization": zero,
        "activation_checkpointing": _activation_checkpointing_section(ckpt_cfg, n_blocks),
        "steps_per_print": int(steps_per_print) if steps_per_print is not None else _NO_PRINT,
        "wall_clock_breakdown": False,
    }
    config.update(sections or {})
    if _value(ecfg.offload_optimizer) != "none":
        # ds_hydra passes a torch optimizer; DeepSpeed otherwise insists on its own CPU Adam here.
        config["zero_force_ds_cpu_optimizer"] = False
    extra = OmegaConf.to_container(ecfg.extra, resolve=True) if not isinstance(ecfg.extra, dict) else ecfg.extra
    return _deep_merge(config, extra or {})


def _activation_checkpointing_section(ckpt, n_blocks: Optional[int]) -> Dict[str, Any]:
    ours = translate_checkpointing_keys(ckpt)  # segments or number_checkpoints; offload or cpu_checkpointing
    number = ours.segments or None
    if not number and ckpt.get("full"):
        number = n_blocks
    return {
        "partition_activations": bool(ckpt.get("partition_activations", False)),
        "cpu_checkpointing": ours.offload,
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
    "ds_hydra.deepspeed.lr_schedules.WarmupLR": "WarmupLR", "ds_hydra.deepspeed.lr_schedules.WarmupDecayLR": "WarmupDecayLR",
    "ds_hydra.deepspeed.lr_schedules.WarmupCosineLR": "WarmupCosineLR", "ds_hydra.deepspeed.lr_schedules.OneCycle": "OneCycle",
    "ds_hydra.deepspeed.lr_schedules.LRRangeTest": "LRRangeTest",
}


def optimizer_and_scheduler_sections(optimizer_cfg, scheduler_cfg) -> Dict[str, Any]:
    """DeepSpeed's ``optimizer`` and ``scheduler`` sections for the ``optimizer`` and ``scheduler`` configs
    (what DeepSpeed builds from them is what ds_hydra trains with); a schedule DeepSpeed lacks is left out."""
    from omegaconf import OmegaConf

    sections: Dict[str, Any] = {}
    optimizer = OmegaConf.to_container(optimizer_cfg, resolve=True)
    name = DEEPSPEED_OPTIMIZER_NAMES.get(optimizer.pop("_target_", None))
    optimizer.pop("_partial_", None)
    if name is not None:
        params = {k: _value(v) for k, v in optimizer.items() if v is not None}
        if name in ("Adam", "AdamW"):
            params = _adam_params(name, params)
        sections["optimizer"] = {"type": name, "params": params}
    scheduler = OmegaConf.to_container(scheduler_cfg, resolve=True)
    name = DEEPSPEED_SCHEDULER_NAMES.get(scheduler.pop("_target_", None))
    scheduler.pop("_partial_", None)
    if name is not None:
        sections["scheduler"] = {"type": name, "params": {k: _value(v) for k, v in scheduler.items()}}
    else:
        log.info("scheduler %s has no DeepSpeed type: the file has no scheduler section", scheduler_cfg._target_)
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
    from ds_hydra.devices import precision_name, resolve_device, resolve_precision

    name = _value(cfg.trainer.precision)
    if name != "auto":
        return name
    return precision_name(resolve_precision("auto", resolve_device(cfg.trainer.device)))


def export_deepspeed(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``task=export_deepspeed``: write DeepSpeed's JSON config for this config; train nothing."""
    from ds_hydra.common import launch_env
    from ds_hydra.models.config import configured_blocks
    from ds_hydra.common.run_dir import resolve_run_dir

    ecfg = cfg.engine
    world = int(ecfg.export_world_size or launch_env.world_size())
    precision = export_precision(cfg)
    config = deepspeed_config(cfg, world, precision, n_blocks=configured_blocks(cfg.model), for_file=True)
    if ecfg.config_file:
        path = Path(ecfg.config_file)
    else:
        path = resolve_run_dir(run_dir) / DEEPSPEED_CONFIG_FILE
    try:
        if launch_env.rank() == 0:  # under a launcher: one writer
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




def _value(x):
    return getattr(x, "value", x)
