"""Load a trained run for inference: its saved config, a clean model, and its weights, safely.

A run directory written by ``train`` holds ``config_resolved.yaml`` (every value resolved) and
``checkpoints/step_*.pt``. The model is rebuilt from that saved config, not from the current
defaults, with none of training's transforms (no activation checkpointing, no compile, no
distributed wrapper). Weights are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. The run's files are only read, never written.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ds_hydra.devices import resolve_device
from ds_hydra.errors import UserError
from ds_hydra.training import state as state_io
from ds_hydra.training.run_dir import RESOLVED_CONFIG_FILE

log = logging.getLogger(__name__)

KEY = "inference.checkpoint"


@dataclass
class LoadedRun:
    """A trained run, ready to sample from or evaluate."""

    run_dir: Path
    checkpoint: Path
    step: int
    config: DictConfig  # the run's saved, resolved config
    model: nn.Module  # clean, in eval mode, on ``device`` in ``dtype``
    corpus: Any
    device: torch.device
    dtype: torch.dtype


def find_run(checkpoint: Optional[str]) -> Tuple[Path, Path]:
    """``(run_dir, weights file)`` for a run directory or one of its ``checkpoints/step_*.pt`` files."""
    if not checkpoint:
        raise UserError(f"{KEY} is not set: give the run directory of a trained run ({KEY}=outputs/<date>/<time>)")
    path = Path(checkpoint).expanduser()
    if path.is_file():
        if path.parent.name != state_io.CHECKPOINT_DIR:
            raise UserError(f"{KEY}={checkpoint}: a file outside a run's {state_io.CHECKPOINT_DIR}/; give the run directory")
        run_dir, weights = path.parent.parent, path
    elif path.is_dir():
        run_dir, weights = path, None
    else:
        raise UserError(f"{KEY}={checkpoint}: no such directory (give the run directory of a trained run)")
    if not (run_dir / RESOLVED_CONFIG_FILE).is_file():
        below = _runs_below(run_dir)
        hint = f"; runs below it: {', '.join(below)}" if below else ""
        raise UserError(f"{KEY}={checkpoint}: no {RESOLVED_CONFIG_FILE}, so not the directory of a training run{hint}")
    if weights is None:
        weights = state_io.latest_checkpoint(run_dir)
        if weights is None:
            raise UserError(
                f"{KEY}={checkpoint}: the run has no weights (no {state_io.CHECKPOINT_DIR}/step_*.pt); "
                "it was stopped before its first save"
            )
    return run_dir, weights


def _runs_below(folder: Path, limit: int = 3) -> List[str]:
    found = sorted(str(p.parent) for pattern in ("*/", "*/*/") for p in folder.glob(pattern + RESOLVED_CONFIG_FILE))
    return found[-limit:]


def load_run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / RESOLVED_CONFIG_FILE
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors and unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable config ({first[:200]})") from None
    if not isinstance(cfg, DictConfig) or not all(isinstance(cfg.get(k), DictConfig) for k in ("model", "data")):
        raise UserError(f"{path}: not a ds_hydra run config (needs its model and data sections)")
    return cfg


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA (fp16 where the GPU has no bf16) and fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_run(
    checkpoint: Optional[str],
    device: str = "auto",
    dtype: str = "auto",
    allowed_targets: Optional[List[str]] = None,
) -> LoadedRun:
    """Rebuild the trained model of a run directory and load its latest (or the named) weights.

    ``allowed_targets`` are the *current* invocation's extra ``_target_`` prefixes: a run directory's
    own ``allowed_targets`` are not trusted, so a copied-in run cannot make us import other code.
    """
    from ds_hydra.training.trainer import build_corpus, build_model

    run_dir, weights = find_run(checkpoint)
    saved = load_run_config(run_dir)
    torch_device = resolve_device(device, key="inference.device")
    torch_dtype = resolve_dtype(dtype, torch_device)

    # Only the sections that define the model and its data, under the caller's allowlist.
    build_cfg = OmegaConf.create(
        {
            "model": OmegaConf.to_container(saved.model, resolve=True),
            "data": OmegaConf.to_container(saved.data, resolve=True),
            "allowed_targets": list(allowed_targets or []),
        }
    )
    config_file = run_dir / RESOLVED_CONFIG_FILE
    try:
        corpus = build_corpus(build_cfg)
        model = build_model(build_cfg, corpus.vocab_size)
    except UserError as exc:  # a refused _target_, a missing data file: say which config asked for it
        raise UserError(f"{config_file}: {exc}") from None
    except Exception as exc:  # e.g. a value the model's constructor rejects
        reason = str(exc).strip().splitlines()
        raise UserError(f"{config_file}: cannot build its model ({reason[-1] if reason else type(exc).__name__})") from None

    state = state_io.safe_torch_load(weights)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{weights}: not a ds_hydra training checkpoint (it has no 'model' weights)")
    load_weights(model, state["model"], weights, run_dir)

    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()  # dropout off
    model.requires_grad_(False)
    step = int(state.get("step", _step_from_name(weights)))
    return LoadedRun(run_dir, weights, step, saved, model, corpus, torch_device, torch_dtype)


def _step_from_name(path: Path) -> int:
    found = re.search(r"(\d+)", path.stem)
    return int(found.group(1)) if found else -1


def load_weights(model: nn.Module, saved: Dict[str, Any], weights: Path, run_dir: Path) -> None:
    """``load_state_dict(strict=True)`` after mapping training-wrapper names back to the clean model's.

    Training may save the state dict of a model whose blocks were wrapped for activation
    checkpointing or compiled; those wrappers add levels to parameter names. The names are mapped
    back to the clean model's through the parameters themselves (see ``_canonical_names``).
    """
    expected = model.state_dict()
    if set(saved) != set(expected):
        saved = _canonical_names(model, saved)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    where = f"{weights} does not fit the model of {run_dir / RESOLVED_CONFIG_FILE}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        raise UserError(f"{where}: {'; '.join(parts)}")
    mismatched = [
        f"{k} is {tuple(saved[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape
    ]
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UserError(f"{where}: {mismatched[0]}{more}")
    model.load_state_dict(saved, strict=True)


def _listing(keys: List[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile(model), DistributedDataParallel
_WRAPPER_LEVELS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
_NESTED_BLOCK = re.compile(r"^(.*?\bblocks)\.(\d+)\.blocks\.(\d+)\.(.*)$")


def _canonical_names(model: nn.Module, saved: Dict[str, Any]) -> Dict[str, Any]:
    """Rename saved keys to the clean model's names; keys that cannot be mapped are left as they are.

    * ``_orig_mod.`` / ``module.`` prefixes (a compiled or DDP-wrapped whole model) are dropped, and so
      are wrapper levels around single submodules (``_orig_mod``, ``_checkpoint_wrapped_module``).
    * Activation-checkpoint segments replace ``blocks[start]`` with a module holding blocks
      ``start..end-1`` as ``blocks[start].blocks[j]``, so ``blocks.S.blocks.J.x`` is ``blocks.{S+J}.x``.
    """
    expected = set(model.state_dict())
    renamed = {}
    for key, value in saved.items():
        name = key
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix) and name not in expected:
                name = name[len(prefix):]
        for wrapper in _WRAPPER_LEVELS:  # wrappers around one submodule: torch.compile, torch's checkpoint_wrapper
            name = name.replace(f".{wrapper}.", ".")
        while name not in expected:
            nested = _NESTED_BLOCK.match(name)
            if not nested:
                break
            head, start, offset, rest = nested.groups()
            name = f"{head}.{int(start) + int(offset)}.{rest}"
        renamed[name] = value
    return renamed
