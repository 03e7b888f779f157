"""Data-parallel training on torch.distributed: the process group, the DDP and FSDP2 wrappers, and
checkpoints that a single process can load.

``setup_distributed(cfg.engine, device)`` returns a ``Distributed``: which engine runs (``single``,
``ddp``, ``fsdp`` or ``deepspeed``), this process's rank and world size, and its device (``cuda:LOCAL_RANK``
on GPUs). The trainer calls it for everything that differs between one process and many:

* ``wrap(model, ...)``: the last model transform (``prepare_model`` step 3): DDP, or FSDP2's
  ``fully_shard`` on every block and then on the root;
* ``gradient_sync(wrapped, last_micro_batch)``: DDP skips the all-reduce (``no_sync``) on all but the
  last micro-batch of a step, so accumulation costs one all-reduce per step as in one process;
* ``sum_``/``mean``: collectives for logged losses and evaluation;
* ``model_state_dict``/``optimizer_state_dict`` and their loaders: the full, unsharded state in the
  same format as a single process's, so every checkpoint loads anywhere.

The process group is created here unless a launcher-aware caller (``ds_hydra.engine.launch``, before
Hydra runs) already did; started without a launcher, ``ddp``/``fsdp``/``deepspeed`` run as a
one-process group on an in-memory store.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from datetime import timedelta
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "Distributed",
    "setup_distributed",
    "resolve_engine",
    "launched",
    "env_world_size",
    "is_main_process",
    "fully_shard_api",
]

# Collectives wait this long before failing (a rank saving a large checkpoint keeps the others waiting).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


# -- the launcher's environment -------------------------------------------------------------------
def launched() -> bool:
    """Whether a launcher (torchrun, the deepspeed launcher, a cluster script) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main_process() -> bool:
    """Rank 0 (the only writer of run files); true in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def resolve_engine(name: str) -> str:
    """``auto`` -> ``ddp`` when the launcher started several processes, else ``single``."""
    if name == "auto":
        return "ddp" if env_world_size() > 1 else "single"
    return name


# -- setup ----------------------------------------------------------------------------------------
class Distributed:
    """This process's place in the run and the engine-specific operations the trainer calls."""

    def __init__(self, kind: str, device: torch.device, rank: int = 0, world_size: int = 1, owns_group: bool = False):
        self.kind = kind  # single | ddp | fsdp | deepspeed
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.owns_group = owns_group
        self.ds_engine = None  # engine=deepspeed: set once deepspeed.initialize has run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective(self) -> bool:
        """Whether a process group exists (every engine but ``single``)."""
        return self.kind != "single"

    def describe(self) -> str:
        if self.kind == "single":
            return f"one process on {self.device}"
        return f"{self.kind}: rank {self.rank} of {self.world_size} on {self.device}"

    # -- the model -----------------------------------------------------------------------------
    def wrap(self, model: nn.Module, engine_cfg, autocast_dtype: Optional[torch.dtype], blocks: Optional[str] = None) -> nn.Module:
        """DDP or FSDP2 around the (checkpointed, compiled) model; the model itself otherwise."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=engine_cfg.bucket_cap_mb,
                find_unused_parameters=engine_cfg.find_unused_parameters,
                gradient_as_bucket_view=engine_cfg.gradient_as_bucket_view,
            )
        if self.kind == "fsdp":
            return shard_model(model, engine_cfg, self.device, autocast_dtype, blocks)
        return model

    def gradient_sync(self, wrapped: nn.Module, last_micro_batch: bool):
        """DDP: no all-reduce on all but the last micro-batch of a step (``no_sync``).

        FSDP reduce-scatters every micro-batch on purpose: skipping it would keep whole unsharded
        gradients until the last one, giving back the memory that sharding saves.
        """
        if self.kind == "ddp" and not last_micro_batch:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    # -- collectives ---------------------------------------------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place across ranks; returns the tensor."""
        if self.collective and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks, the same on every rank (``tensor`` itself in one process)."""
        if not (self.collective and self.world_size > 1):
            return tensor
        return self.sum_(tensor.detach().clone()) / self.world_size

    def barrier(self) -> None:
        if self.collective and self.world_size > 1:
            dist.barrier()

    # -- checkpoints: the full state, in a single process's format -------------------------------
    # FSDP and DeepSpeed gather in these calls: every rank must make them, at the same step.
    def model_state_dict(self, model: nn.Module) -> Dict[str, Any]:
        """The unwrapped model's full state dict (FSDP, DeepSpeed: fp32 on rank 0's CPU, empty elsewhere)."""
        if self.kind == "deepspeed":
            from ds_hydra.engine import deepspeed_engine

            return deepspeed_engine.full_model_state_dict(self.ds_engine, self.is_main)
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(model, options=_full_options(cpu_offload=True))
        return model.state_dict()

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int = 0) -> Dict[str, Any]:
        """``optimizer.state_dict()``'s format (parameters numbered in param-group order).

        FSDP: gathered to rank 0 on the CPU (empty elsewhere); torch names parameters by their
        path there, which ``indexed_optimizer_state`` turns back into numbers. DeepSpeed: the tag of
        its own checkpoint of this step (``save_engine_checkpoint``), which holds the sharded state.
        """
        if self.kind == "deepspeed":
            from ds_hydra.engine import deepspeed_engine

            return {"deepspeed_checkpoint": deepspeed_engine.checkpoint_tag(step)}
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
            return indexed_optimizer_state(state) if state else {}
        return optimizer.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: Dict[str, Any]) -> None:
        """Load a full state dict (every rank passes the whole of it). DeepSpeed: nothing here, its
        checkpoint (``load_optimizer_state_dict``) restores the weights with their fp32 master copy."""
        if self.kind == "deepspeed":
            return
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, state, options=_full_options())
            return
        model.load_state_dict(state)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any], run_dir=None) -> None:
        if self.kind == "deepspeed":
            from ds_hydra.engine import deepspeed_engine

            if "deepspeed_checkpoint" not in state:
                raise UserError("engine=deepspeed: this checkpoint was not written by engine=deepspeed; resume it with its own engine")
            deepspeed_engine.load_checkpoint(self.ds_engine, run_dir, state["deepspeed_checkpoint"])
            return
        if "deepspeed_checkpoint" in state:
            raise UserError(f"engine={self.kind}: this checkpoint's optimizer state is DeepSpeed's; resume it with engine=deepspeed")
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            named = named_optimizer_state(state, model, optimizer)
            set_optimizer_state_dict(model, optimizer, named, options=_full_options())
            return
        optimizer.load_state_dict(state)

    def save_engine_checkpoint(self, run_dir, step: int) -> None:
        """DeepSpeed: its own checkpoint of this step, every rank writing its shards (no-op otherwise)."""
        if self.kind == "deepspeed":
            from ds_hydra.engine import deepspeed_engine

            deepspeed_engine.save_checkpoint(self.ds_engine, run_dir, step)

    def prune_engine_checkpoints(self, run_dir) -> None:
        """DeepSpeed: drop its checkpoints whose step_N.pt was pruned (rank 0; no-op otherwise)."""
        if self.kind == "deepspeed" and self.is_main:
            from ds_hydra.engine import deepspeed_engine

            deepspeed_engine.prune_checkpoints(run_dir)

    def close(self) -> None:
        """Destroy the process group if this object created it (the launcher's stays up)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup_distributed(engine_cfg, device: torch.device) -> Distributed:
    """The engine this run uses, with its process group up and this rank's device selected."""
    kind = resolve_engine(getattr(engine_cfg.name, "value", engine_cfg.name))
    if kind == "single":
        return Distributed("single", device)
    device = _rank_device(device)
    unsupported = fsdp_unsupported(device) if kind == "fsdp" else None
    if unsupported is not None:
        raise UserError(f"engine=fsdp: {unsupported}; use engine=ddp")
    owns = init_process_group(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1:
        dist.barrier()  # every rank has checked the run dir before any rank writes into it
    return Distributed(kind, device, rank=rank, world_size=world, owns_group=owns)


def _rank_device(device: torch.device) -> torch.device:
    """Under a launcher every rank takes ``cuda:LOCAL_RANK``."""
    if device.type != "cuda":
        return device
    local = env_local_rank()
    if env_world_size() > 1 and device.index is not None and device.index != local:
        raise UserError(
            f"trainer.device={device}: with several processes each rank uses cuda:LOCAL_RANK; set trainer.device=cuda or auto"
        )
    if local >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} GPUs; start at most that many "
            "processes per node (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_process_group(device: torch.device) -> bool:
    """Create the default process group unless one exists; returns whether this call created it.

    Launched: from the launcher's environment (env://). Otherwise a one-process group on an
    in-memory store (no port to pick, nothing to clash with).
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched():
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=PROCESS_GROUP_TIMEOUT)
    return True


def _full_options(cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


# -- FSDP2 ----------------------------------------------------------------------------------------
def fsdp_unsupported(device: torch.device) -> Optional[str]:
    """Why FSDP2 cannot run on ``device`` with this torch, or None when it can."""
    if fully_shard_api() is None:
        return f"needs FSDP2 (fully_shard), which torch {torch.__version__} lacks (torch >= 2.4 has it)"
    if device.type == "cpu" and torch.__version__ < (2, 7):  # 2.4-2.6's FSDP2 needs CUDA streams or their events
        return f"FSDP2 on the CPU needs torch >= 2.7 (torch {torch.__version__}'s needs CUDA streams)"
    return None


def fully_shard_api():
    """``(fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy)``: public in torch >= 2.6, under
    ``torch.distributed._composable.fsdp`` in 2.4 and 2.5; None when this torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        except ImportError:
            return None
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy


def shard_model(model: nn.Module, engine_cfg, device: torch.device, autocast_dtype: Optional[torch.dtype], blocks: Optional[str] = None) -> nn.Module:
    """``fully_shard`` every block that has parameters (a checkpointed segment counts as one), then the
    root (embeddings, final norm, head). In place: the model keeps its class, attributes and names."""
    from ds_hydra.activation_checkpointing.apply import find_blocks

    fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy = fully_shard_api()
    kwargs: Dict[str, Any] = {"reshard_after_forward": engine_cfg.reshard_after_forward}
    if engine_cfg.mixed_precision and device.type == "cuda" and autocast_dtype in (torch.bfloat16, torch.float16):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
    if engine_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    _, block_list = find_blocks(model, blocks)
    for block in block_list:
        if any(True for _ in block.parameters()):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # Newer torch warns when a sharded module returns a view (GPT's vocabulary-sliced logits), in case
    # the caller modifies it in place; the trainer never does (it drops the logits).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


# -- optimizer state: named (FSDP's full state dict) <-> numbered (optimizer.state_dict()) --------
def indexed_optimizer_state(named: Dict[str, Any]) -> Dict[str, Any]:
    """Number the parameters of a path-keyed optimizer state dict in param-group order, as
    ``torch.optim.Optimizer.state_dict()`` does; the inverse of ``named_optimizer_state``."""
    index: Dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in named["state"].items()}
    return {"state": state, "param_groups": groups}


def named_optimizer_state(indexed: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Key an ``optimizer.state_dict()``-format state by parameter path, for ``set_optimizer_state_dict``."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in indexed["param_groups"]):
        raise UserError("checkpoint optimizer state: its param groups do not match this model's (another model or param_groups config?)")
    groups = []
    for group in indexed["param_groups"]:
        groups.append({**group, "params": [order[i] for i in group["params"]]})
    state = {order[int(i)]: value for i, value in indexed["state"].items()}
    return {"state": state, "param_groups": groups}
