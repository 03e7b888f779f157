"""``engine=deepspeed``: DeepSpeed's engine (ZeRO stages, offload) driven by the Hydra config.

ds_hydra derives DeepSpeed's JSON config from its own (``ds_hydra.deepspeed.json_export``) and hands
DeepSpeed its param groups, optimizer and scheduler as callables::

    deepspeed.initialize(model=model, model_parameters=<ds_hydra's param groups>,
                         optimizer=<optimizer callable>, lr_scheduler=<scheduler callable>, config=<dict>)

DeepSpeed divides each micro-batch's loss by the accumulation steps, reduces, clips and steps the
optimizer and the scheduler at the last micro-batch of a step, and scales fp16 losses itself; ``backward``
undoes its averaging, so a step's gradient is that of the mean over the step's label tokens.

Checkpoints: rank 0 writes ``checkpoints/step_N.pt`` whose ``model`` entry is the full model in fp32
(loadable by one process, with no DeepSpeed), and every rank writes DeepSpeed's own checkpoint (ZeRO
shards, fp32 master weights, optimizer state) under ``checkpoints/deepspeed/step_N``, from which
training resumes. ``trainer.checkpoint_format=dcp`` (torch.distributed.checkpoint) is refused: this
engine keeps DeepSpeed's own format.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Collection, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ds_hydra.devices import precision_name
from ds_hydra.deepspeed.checkpoint_loading import weights_only_loads
from ds_hydra.engine.base import Optimization, ProcessGroupEngine
from ds_hydra.errors import UserError
from ds_hydra.common.checkpoint_files import CHECKPOINT_DIR, list_checkpoints

log = logging.getLogger(__name__)

__all__ = ["DeepSpeedEngine", "import_deepspeed", "DEEPSPEED_CHECKPOINT_DIR"]

DEEPSPEED_CHECKPOINT_DIR = "deepspeed"  # under <run dir>/checkpoints
DCP_REFUSED = (
    "trainer.checkpoint_format=dcp: engine=deepspeed keeps DeepSpeed's own checkpoint format (its save_checkpoint: "
    "ZeRO shards under checkpoints/deepspeed/, beside a full step_N.pt); use trainer.checkpoint_format=auto or full "
    "with engine=deepspeed, or engine=fsdp for torch.distributed.checkpoint shards"
)


class DeepSpeedEngine(ProcessGroupEngine):
    name = "deepspeed"

    def setup(self, model: nn.Module, blocks: Sequence[nn.Module], autocast_dtype: Optional[torch.dtype],
              optimization: Optimization) -> Tuple[nn.Module, Any, Any]:
        """``deepspeed.initialize`` around the model, with ds_hydra's param groups, optimizer and scheduler."""
        from ds_hydra.deepspeed.json_export import deepspeed_json
        from ds_hydra.optim.build import log_param_groups, optimizer_callable, param_groups_for, scheduler_callable

        deepspeed = import_deepspeed(self.device)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it; launchers set it, a lone process has 0
        precision = precision_name(autocast_dtype)
        config = deepspeed_json(
            self.engine_cfg, optimization.activation_checkpointing, batch_size=optimization.batch_size,
            grad_accum_steps=optimization.grad_accum_steps, grad_clip=optimization.grad_clip,
            world_size=self.world_size, precision=precision, n_blocks=len(blocks),
        )
        offloaded = _value(self.engine_cfg.offload_optimizer) != "none"
        # Fused/foreach kernels are chosen for the device the optimizer steps on (the CPU when offloaded).
        factory = optimizer_callable(optimization.optimizer, None if offloaded else self.device)
        groups = param_groups_for(model, optimization.optimizer, optimization.param_groups)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=factory,
            lr_scheduler=scheduler_callable(optimization.scheduler),
            config=config,
            dist_init_required=False,
        )
        self.model = model
        log.info(
            "deepspeed: ZeRO stage %d, %s, train_batch_size %d (micro-batch %d x accumulation %d x %d ranks)",
            config["zero_optimization"]["stage"], precision, config["train_batch_size"],
            config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], self.world_size,
        )
        log_param_groups(self.optimizer)
        return self.ds, self.optimizer, self.scheduler

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        """DeepSpeed's backward and its step, which at the last micro-batch of a step clips, steps the
        optimizer and the scheduler. ``loss`` is the micro-batch's share of the step's token mean (see
        ``Engine.backward``); DeepSpeed divides each micro-batch's loss by the accumulation steps and
        averages gradients over ranks, which the factor ``accum x world size`` undoes."""
        self.ds.backward(loss * (accum * self.world_size))
        self.ds.step()

    def step(self, grad_clip: float) -> None:
        """Nothing left: DeepSpeed stepped at the step's last micro-batch (``backward``)."""

    def skip_step(self) -> None:
        raise UserError("trainer.skip_nonfinite: not with engine=deepspeed (DeepSpeed skips fp16 overflow steps itself)")

    # -- checkpoints ---------------------------------------------------------------------------
    def model_state_dict(self, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
        """The whole model in fp32 on the CPU (rank 0; empty elsewhere): ZeRO-3 gathers its shards."""
        import deepspeed

        module = self.ds.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if not self.is_main:
                return {}
            return {
                k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()
            }

    def optimizer_state_dict(self, step: int) -> Dict[str, Any]:
        """The tag of DeepSpeed's own checkpoint of this step, which holds the sharded state."""
        return {"deepspeed_checkpoint": checkpoint_tag(step)}

    def load_model_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Nothing here: DeepSpeed's checkpoint (``load_optimizer_state_dict``) restores the weights with
        their fp32 master copy."""

    def load_optimizer_state_dict(self, state: Dict[str, Any], run_dir: Path) -> None:
        """Model, fp32 master weights, optimizer and scheduler state from DeepSpeed's checkpoint."""
        if "deepspeed_checkpoint" not in state:
            raise UserError("engine=deepspeed: this checkpoint was not written by engine=deepspeed; resume it with its own engine")
        tag = state["deepspeed_checkpoint"]
        folder = Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_CHECKPOINT_DIR
        if not (folder / tag).is_dir():
            raise UserError(f"{folder / tag}: DeepSpeed checkpoint missing (engine=deepspeed resumes from it)")
        with weights_only_loads(self.ds):  # DeepSpeed's own loader would unpickle anything in the run directory
            path, _ = self.ds.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{folder / tag}: DeepSpeed could not load this checkpoint")

    def sharded_state_dict(self, trainable: Optional[Collection[str]] = None) -> Dict[str, Any]:
        raise UserError(DCP_REFUSED)

    def load_sharded_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        raise UserError(DCP_REFUSED)

    def save_engine_checkpoint(self, run_dir: Path, step: int) -> None:
        """DeepSpeed's own checkpoint of this step: every rank writes its shards."""
        folder = Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_CHECKPOINT_DIR
        self.ds.save_checkpoint(str(folder), tag=checkpoint_tag(step), save_latest=False)

    def prune_engine_checkpoints(self, run_dir: Path) -> None:
        """Delete DeepSpeed checkpoints whose ``step_N.pt`` has been pruned (rank 0)."""
        folder = Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_CHECKPOINT_DIR
        if not self.is_main or not folder.is_dir():
            return
        kept = {p.stem for p in list_checkpoints(run_dir)}
        for tag_dir in folder.iterdir():
            if tag_dir.is_dir() and tag_dir.name.startswith("step_") and tag_dir.name not in kept:
                shutil.rmtree(tag_dir, ignore_errors=True)


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


def checkpoint_tag(step: int) -> str:
    return f"step_{step:07d}"


def _value(x):
    return getattr(x, "value", x)
