"""``engine=fsdp``: torch FSDP2. ``fully_shard`` on every block, then on the root: parameters, gradients
and optimizer state are sharded across ranks and gathered per block for compute. ``full`` checkpoints
hold the state in a single process's format (gathered to rank 0's CPU); ``dcp`` ones each rank's shards."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ds_hydra.engine.base import ProcessGroupEngine
from ds_hydra.errors import UserError
from ds_hydra.optim.state_format import indexed_optimizer_state, named_optimizer_state, optimizer_param_names


class FSDPEngine(ProcessGroupEngine):
    """FSDP reduce-scatters every micro-batch on purpose (no ``no_sync``): skipping it would keep whole
    unsharded gradients until the last one, giving back the memory that sharding saves."""

    name = "fsdp"

    @classmethod
    def check_supported(cls, device: torch.device) -> None:
        unsupported = fsdp_unsupported(device)
        if unsupported is not None:
            raise UserError(f"engine=fsdp: {unsupported}; use engine=ddp")

    def wrap(self, model: nn.Module, blocks: Sequence[nn.Module], autocast_dtype: Optional[torch.dtype]) -> nn.Module:
        return shard_model(model, blocks, self.engine_cfg, self.device, autocast_dtype)

    # FSDP gathers in these calls: every rank must make them, at the same step.
    def model_state_dict(self, trainable_only: bool = False) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = _full_options(cpu_offload=True, ignore_frozen_params=trainable_only)  # an adapter's base: not gathered
        return get_model_state_dict(self.model, options=options)

    def optimizer_state_dict(self, step: int) -> Dict[str, Any]:
        """Gathered to rank 0 on the CPU (empty elsewhere); torch names parameters by their path there,
        which ``indexed_optimizer_state`` turns back into numbers."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer, options=_full_options(cpu_offload=True))
        return indexed_optimizer_state(state) if state else {}

    def load_model_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state, options=_full_options(strict=strict))

    def load_optimizer_state_dict(self, state: Dict[str, Any], run_dir: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if "deepspeed_checkpoint" in state:
            super().load_optimizer_state_dict(state, run_dir)  # refuses it, naming the engine to use
        named = named_optimizer_state(
            state, optimizer_param_names(self.model, self.optimizer),
            mismatch="checkpoint optimizer state: its param groups do not match this model's (another model or param_groups config?)",
        )
        set_optimizer_state_dict(self.model, self.optimizer, named, options=_full_options())


def _full_options(cpu_offload: bool = False, strict: bool = True, ignore_frozen_params: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict, ignore_frozen_params=ignore_frozen_params)


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


def shard_model(model: nn.Module, blocks: Sequence[nn.Module], engine_cfg, device: torch.device,
                autocast_dtype: Optional[torch.dtype]) -> nn.Module:
    """``fully_shard`` every block that has parameters, then the root (embeddings, final norm, head).
    In place: the model keeps its class, attributes and parameter names."""
    fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy = fully_shard_api()
    kwargs: Dict[str, Any] = {"reshard_after_forward": engine_cfg.reshard_after_forward}
    if engine_cfg.mixed_precision and device.type == "cuda" and autocast_dtype in (torch.bfloat16, torch.float16):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
    if engine_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        if any(True for _ in block.parameters()):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # Newer torch warns when a sharded module returns a view (a vocabulary-sliced logits tensor), in case
    # the caller modifies it in place; the trainer never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model
