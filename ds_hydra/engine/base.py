"""The engine interface, and the engine of a single process.

An engine owns everything that differs between one process and many: it wraps the model (the last
transform of ``prepare_model``), builds the optimizer and scheduler around it, runs backward and the
optimizer step, averages numbers over ranks, and turns model and optimizer state into the format of
a single process (and back), so every checkpoint loads anywhere. The trainer calls these methods and
never asks which engine it has:

* ``setup(model, blocks, autocast_dtype, optimization)`` -> ``(wrapped, optimizer, scheduler)``, where
  ``optimization`` (an ``Optimization``) holds the optimizer, scheduler and param-group configs and the
  shape of a step, cut from the run's config by the trainer: an engine reads its own ``engine`` config
  and these, never the whole config;
* ``micro_batch(last)``: a context around one micro-batch's forward and backward;
* ``backward(loss, accum)`` (``loss``: a micro-batch's summed loss over the step's label tokens, all ranks) and
  ``step(grad_clip)`` / ``skip_step()``;
* ``sum_``, ``mean``, ``barrier``;
* ``model_state_dict``, ``optimizer_state_dict``, their loaders (the ``full`` format: one process's
  state dict), ``sharded_state_dict`` and its loader (the ``dcp`` format: each rank's shards),
  ``save_engine_checkpoint``, ``prune_engine_checkpoints``; ``close``.

``Engine`` itself is one process without a process group; ``DDPEngine``, ``FSDPEngine`` and
``DeepSpeedEngine`` extend it. ``ds_hydra.engine.start_engine`` picks one from the ``engine`` config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ds_hydra.errors import UserError


@dataclass(frozen=True)
class Optimization:
    """What an engine builds around the model, and the shape of one optimizer step: the slices of the
    run's config an engine needs besides its own ``engine`` config (the trainer cuts them)."""

    optimizer: Any
    """The ``optimizer`` config: a ``_partial_`` optimizer, built over the model's param groups."""
    scheduler: Any
    """The ``scheduler`` config: a ``_partial_`` schedule, built over the optimizer."""
    param_groups: Any = None
    """The ``param_groups`` rules (None: the defaults)."""
    in_backward: bool = False
    """``trainer.optimizer_in_backward``: each parameter steps inside backward, once its gradient is ready."""
    batch_size: int = 1
    """``trainer.batch_size``: sequences per micro-batch on each rank (DeepSpeed's config states it)."""
    grad_accum_steps: int = 1
    """``trainer.grad_accum_steps``: micro-batches per optimizer step (DeepSpeed counts them itself)."""
    grad_clip: float = 0.0
    """``trainer.grad_clip`` (0: off); DeepSpeed clips inside its own step."""
    activation_checkpointing: Any = None
    """The ``ckpt`` config, which DeepSpeed's JSON config records (its ``activation_checkpointing`` section)."""


class Engine:
    """One process on one device."""

    name = "single"

    def __init__(self, engine_cfg, device: torch.device, rank: int = 0, world_size: int = 1, owns_group: bool = False):
        self.engine_cfg = engine_cfg  # this engine's own config (the `engine` group)
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.owns_group = owns_group
        self.model: Optional[nn.Module] = None  # the unwrapped model: its names and state dict
        self.optimizer = None
        self.scheduler = None
        self.scaler = None  # fp16 loss scaling (torch's GradScaler), when the engine does it itself

    @classmethod
    def start(cls, engine_cfg, device: torch.device) -> "Engine":
        """This rank's engine, its process group up (where it needs one) and its device chosen."""
        return cls(engine_cfg, device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer of run files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"one process on {self.device}"

    # -- building ------------------------------------------------------------------------------
    def setup(self, model: nn.Module, blocks: Sequence[nn.Module], autocast_dtype: Optional[torch.dtype],
              optimization: Optimization) -> Tuple[nn.Module, Any, Any]:
        """Wrap ``model`` and build its optimizer and scheduler; returns ``(wrapped, optimizer, scheduler)``,
        where ``wrapped`` is what the trainer calls for forward and backward."""
        from ds_hydra.optim.build import build_optimizer, build_scheduler

        self.model = model
        wrapped = self.wrap(model, blocks, autocast_dtype)
        in_backward = optimization.in_backward
        if in_backward and self.world_size > 1:
            raise UserError(
                f"trainer.optimizer_in_backward=true: not with {self.world_size} processes ({self.describe()}): each "
                f"gradient must be reduced across ranks before its parameter steps; run one process or set it false"
            )
        self.optimizer = build_optimizer(
            optimization.optimizer, model, self.device, param_groups=optimization.param_groups, in_backward=in_backward
        )
        self.scheduler = build_scheduler(optimization.scheduler, self.optimizer)
        if autocast_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")  # fp16 gradients underflow without loss scaling
        return wrapped, self.optimizer, self.scheduler

    def wrap(self, model: nn.Module, blocks: Sequence[nn.Module], autocast_dtype: Optional[torch.dtype]) -> nn.Module:
        return model

    # -- one step ------------------------------------------------------------------------------
    def micro_batch(self, last: bool):
        """A context around one micro-batch's forward and backward (``last``: the step's final one)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        """Backward of one micro-batch's share of the step's loss: its summed token losses over the label
        tokens of the whole step (every micro-batch of every rank). The gradients of the step's ``accum``
        micro-batches on all ranks then add up to the gradient of the step's token mean; an engine that
        averages gradients over its ranks (DDP, FSDP) has the share multiplied by the world size first."""
        if self.world_size > 1:
            loss = loss * self.world_size
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, grad_clip: float) -> None:
        """Clip the global gradient norm (``grad_clip`` > 0), step the optimizer and the schedule."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def skip_step(self) -> None:
        """Drop this step's gradients and update; the schedule moves on (``trainer.skip_nonfinite``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # -- collectives ---------------------------------------------------------------------------
    @property
    def collective(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place across ranks; returns the tensor."""
        if self.collective:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks, the same on every rank (``tensor`` itself in one process)."""
        if not self.collective:
            return tensor
        return self.sum_(tensor.detach().clone()) / self.world_size

    def barrier(self) -> None:
        if self.collective:
            dist.barrier()

    # -- checkpoints: the full state, in a single process's format -------------------------------
    def model_state_dict(self, trainable_only: bool = False) -> Dict[str, Any]:
        """The unwrapped model's full state dict (sharding engines: on rank 0, empty elsewhere);
        ``trainable_only``: an engine that gathers may leave the frozen parameters out (an adapter run's base)."""
        return self.model.state_dict()

    def optimizer_state_dict(self, step: int) -> Dict[str, Any]:
        """``optimizer.state_dict()``'s format: parameters numbered in param-group order."""
        return self.optimizer.state_dict()

    def load_model_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Load a full state dict (every rank passes the whole of it); ``strict=False``: only the entries
        it has (an adapter run's trainable parameters)."""
        self.model.load_state_dict(state, strict=strict)

    def load_optimizer_state_dict(self, state: Dict[str, Any], run_dir: Path) -> None:
        if "deepspeed_checkpoint" in state:
            raise UserError(f"engine={self.name}: this checkpoint's optimizer state is DeepSpeed's; resume it with engine=deepspeed")
        self.optimizer.load_state_dict(state)

    # -- checkpoints: each rank's own shards (trainer.checkpoint_format=dcp) ------------------------
    def sharded_state_dict(self, trainable: Optional[Collection[str]] = None) -> Dict[str, Any]:
        """``{"model", "optimizer"}`` as this rank holds them, keyed by parameter path (torch's
        ``get_state_dict``: FSDP's DTensor shards, DDP's and one process's whole tensors): what
        torch.distributed.checkpoint saves and, as a template filled in place, loads. ``trainable``: the
        model's entries of these parameter paths alone (an adapter run's; not its frozen base)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=trainable is not None)
        model, optimizer = get_state_dict(self.model, self.optimizer, options=options)
        if trainable is not None:  # the base's buffers too stay out: the base is model.pretrained or kept in the run dir
            model = {name: value for name, value in model.items() if name in trainable}
        return {"model": model, "optimizer": optimizer}

    def load_sharded_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Load what ``sharded_state_dict`` gave, once torch.distributed.checkpoint has filled it;
        ``strict=False``: the model's entries it has alone (an adapter run's trainable parameters)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=strict))

    def save_engine_checkpoint(self, run_dir: Path, step: int) -> None:
        """An engine's own checkpoint files beside ``step_N.pt`` (DeepSpeed's shards); none here."""

    def prune_engine_checkpoints(self, run_dir: Path) -> None:
        """Drop the engine's own files of pruned checkpoints; none here."""

    def close(self) -> None:
        """Destroy the process group if this engine created it (a launcher's stays up)."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            from ds_hydra.engine.process_group import leave_process_group

            leave_process_group(dist)
        self.owns_group = False


class ProcessGroupEngine(Engine):
    """An engine whose ranks meet in the default process group (one rank when not launched)."""

    @classmethod
    def start(cls, engine_cfg, device: torch.device) -> "Engine":
        from ds_hydra.engine.process_group import init_process_group, rank_device

        device = rank_device(device)
        cls.check_supported(device)
        owns = init_process_group(device)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world > 1:
            dist.barrier()  # every rank has checked the run dir before any rank writes into it
        return cls(engine_cfg, device, rank=rank, world_size=world, owns_group=owns)

    @classmethod
    def check_supported(cls, device: torch.device) -> None:
        """Raise ``UserError`` when this engine cannot run on ``device`` with this torch."""

    def describe(self) -> str:
        return f"{self.name}: rank {self.rank} of {self.world_size} on {self.device}"
