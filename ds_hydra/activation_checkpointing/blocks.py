"""Finding a model's block list: the repeated layers that activation checkpointing recomputes."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

from ds_hydra.errors import UserError

CONTAINERS = (nn.ModuleList, nn.Sequential)


def original_class(module: nn.Module) -> type:
    """The module's class before checkpointing swapped it for a subclass."""
    return getattr(type(module), "_ds_hydra_original_class", type(module))


def _describe(name: str, container: nn.Module) -> str:
    types = sorted({original_class(m).__name__ for m in container})
    kind = type(container).__name__
    return f"{name or '<root>'} ({kind} of {len(container)}: {', '.join(types)})"


def block_list_candidates(model: nn.Module) -> List[Tuple[str, nn.Module, bool]]:
    """Every ModuleList/Sequential in the model: (dotted path, container, all entries of one type)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, CONTAINERS) and len(module) > 0:
            same_type = len({original_class(m) for m in module}) == 1
            found.append((name, module, same_type))
    return found


def find_blocks(model: nn.Module, blocks: Optional[str] = None) -> Tuple[str, nn.Module]:
    """(path, container) of the block list: the module at dotted path ``blocks`` if given, else the
    longest ModuleList/Sequential whose entries all have one type (the first one found on a tie)."""
    candidates = block_list_candidates(model)
    listing = "; ".join(_describe(n, c) for n, c, _ in candidates[:8]) or "none"
    if blocks:
        try:
            module = model.get_submodule(blocks)
        except AttributeError:
            raise UserError(
                f"ckpt.blocks={blocks}: {type(model).__name__} has no such submodule; block lists found: {listing}"
            ) from None
        if not isinstance(module, CONTAINERS) or len(module) == 0:
            raise UserError(
                f"ckpt.blocks={blocks}: is a {type(module).__name__}, not a non-empty ModuleList or Sequential; "
                f"block lists found: {listing}"
            )
        return blocks, module
    best = None
    for name, module, same_type in candidates:
        if same_type and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise UserError(
            f"ckpt.blocks: no block list found in {type(model).__name__} (no ModuleList or Sequential whose "
            f"entries share one type); name one with ckpt.blocks=<dotted path>; candidates: {listing}"
        )
    return best


def model_blocks(model: nn.Module, blocks: Optional[str] = None) -> Tuple[str, List[nn.Module]]:
    """``(path, blocks)``: the model's block list, found once for every transform that works per block
    (activation checkpointing, per-block compile, FSDP sharding). A model without one gets ``("", [])``
    unless ``blocks`` names a path, which must exist."""
    try:
        path, container = find_blocks(model, blocks)
    except UserError:
        if blocks:
            raise
        return "", []
    return path, list(container)
