"""Apply activation checkpointing to a model's block list."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ds_hydra.errors import UserError


class CheckpointedSegment(nn.Module):
    """Runs consecutive blocks and lets autograd recompute them in backward (RNG state replayed)."""

    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def _run(self, x, *args, **kwargs):
        for block in self.blocks:
            x = block(x, *args, **kwargs)
        return x

    def forward(self, x, *args, **kwargs):
        return checkpoint(self._run, x, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def find_blocks(model: nn.Module, blocks: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The block list: the module at dotted path ``blocks``, else the longest ModuleList of one type."""
    if blocks:
        try:
            module = model.get_submodule(blocks)
        except AttributeError:
            raise UserError(f"ckpt.blocks={blocks}: no such submodule") from None
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            raise UserError(f"ckpt.blocks={blocks}: is a {type(module).__name__}, not a ModuleList or Sequential")
        return blocks, module
    best = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UserError("no block list found: the model has no ModuleList/Sequential of same-type modules; name one with ckpt.blocks")
    return best


def checkpoint_activations(model: nn.Module, segments: int = 0, checkpoint_last: bool = False, blocks: Optional[str] = None) -> nn.Module:
    """Checkpoint ``segments`` contiguous segments of the model's blocks, in place; returns the model."""
    if segments == 0:
        return model
    path, block_list = find_blocks(model, blocks)
    n = len(block_list)
    if not 1 <= segments <= n:
        raise UserError(f"ckpt.segments={segments}: must be 0..{n} (the model has {n} blocks)")
    bounds = [round(i * n / segments) for i in range(segments + 1)]
    last = segments if checkpoint_last else segments - 1
    for s in range(segments):
        if s >= last:
            break
        start, end = bounds[s], bounds[s + 1]
        segment = CheckpointedSegment([block_list[i] for i in range(start, end)])
        block_list[start] = segment
        for i in range(start + 1, end):
            block_list[i] = nn.Identity()
    return model
