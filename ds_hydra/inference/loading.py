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
from ds_hydra.common.run_dir import RESOLVED_CONFIG_FILE

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
    data: Any  # the run's data (``ds_hydra.data.base.TokenData``): its splits, vocabulary and text encoding
    device: torch.device
    dtype: torch.dtype
    seq_len: int  # the sequence length the run trained on


def find_run(checkpoint: Optional[str]) -> Tuple[Path, Path]:
    """``(run_dir, weights)`` for a run directory, one of its ``checkpoints/step_*.pt`` files or one of its
    sharded ``checkpoints/step_*/`` directories."""
    if not checkpoint:
        raise UserError(f"{KEY} is not set: give the run directory of a trained run ({KEY}=outputs/<date>/<time>)")
    path = Path(checkpoint).expanduser()
    if state_io.is_sharded_checkpoint(path):  # a dcp checkpoint directory, read whole in this process
        run_dir, weights = path.parent.parent, path
    elif path.is_file():
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
    merge_adapter: bool = False,
) -> LoadedRun:
    """Rebuild the trained model of a run directory and load its latest (or the named) weights.

    ``allowed_targets`` are the *current* invocation's extra ``_target_`` prefixes: a run directory's
    own ``allowed_targets`` are not trusted, so a copied-in run cannot make us import other code.

    A run that trained an adapter comes back as it trained: its base (``model.pretrained``, or the run's
    ``base_model/`` or ``base_model.pt``), quantized as ``model.quantize`` says, with the adapter's trained weights in place.
    ``merge_adapter``: instead, the adapter folded into the full-precision base weights (no quantization),
    the plain architecture again (what ``task=export_hf`` writes and generation runs).
    """
    from ds_hydra.data.base import build_data
    from ds_hydra.data.tokenizer import adopt_run_tokenizer
    from ds_hydra.models.build import build_model
    from ds_hydra.training.seq_vocab import resolve_seq_len
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state

    run_dir, weights = find_run(checkpoint)
    saved = load_run_config(run_dir)
    torch_device = resolve_device(device, key="inference.device")
    torch_dtype = resolve_dtype(dtype, torch_device)

    from ds_hydra.models import adapters
    from ds_hydra.models.adapter_config import adapter_on
    from ds_hydra.training import adapter_base

    adapter_cfg = saved.get("adapter") if adapter_on(saved.get("adapter")) else None
    model_node = OmegaConf.to_container(saved.model, resolve=True)
    if adapter_cfg is not None and merge_adapter and "quantize" in model_node:
        model_node["quantize"] = "none"  # merged into the full-precision base, never into quantized weights
    # Only the sections that define the model and its data, under the caller's allowlist.
    build_cfg = OmegaConf.create(
        {
            "model": model_node,
            "data": _without_cache_dir(OmegaConf.to_container(saved.data, resolve=True)),
            "tokenizer": OmegaConf.to_container(saved.tokenizer, resolve=True) if "tokenizer" in saved else None,
            "allowed_targets": list(allowed_targets or []),
        }
    )
    config_file = run_dir / RESOLVED_CONFIG_FILE
    try:
        data = build_data(build_cfg.data, build_cfg.tokenizer, build_cfg.model.get("pretrained", None))
        adopt_run_tokenizer(data, run_dir)  # decode exactly as training encoded
        init_from = saved.trainer.get("init_from") if "trainer" in saved else None
        keeps_base = adapter_cfg is not None and adapters.base_in_run_dir(saved.model, init_from)
        if keeps_base and adapter_base.has_base(run_dir) is None:
            raise UserError(f"{run_dir / adapter_base.BASE_FILE}: missing (nor is there {run_dir / adapter_base.BASE_DIR}); "
                            f"this adapter run keeps its frozen base there")
        load_base = (lambda base: adapter_base.load_base(base, run_dir)) if keeps_base else None
        # a QLoRA base kept as a model directory is read block by block as it is quantized, as it was trained
        # (kept_base: the folder to read, or None for base_model.pt; a base exists, checked above)
        model = build_model(build_cfg.model, data.vocab_size, adapter_cfg, load_base=load_base,
                            kept_base=adapter_base.kept_base(run_dir, writes=False) if keeps_base else None)
        seq_len = resolve_seq_len(data, model)
    except UserError as exc:  # a refused _target_, a missing data file: say which config asked for it
        raise UserError(f"{config_file}: {exc}") from None
    except Exception as exc:  # e.g. a value the model's constructor rejects
        reason = str(exc).strip().splitlines()
        raise UserError(f"{config_file}: cannot build its model ({reason[-1] if reason else type(exc).__name__})") from None

    state = load_checkpoint_state(weights, with_optimizer=False)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{weights}: not a ds_hydra training checkpoint (it has no 'model' weights)")
    if adapter_cfg is not None:
        adapters.load_trainable_state(model, state["model"], str(weights))
        if merge_adapter:
            adapters.merge_adapters(model)
    else:
        load_weights(model, state["model"], weights, run_dir)

    if any(getattr(p, "quant_state", None) is not None or p.dtype == torch.int8 for p in model.parameters()):
        model.to(device=torch_device)  # quantized weights keep their storage; they compute in their own dtype
    else:
        model.to(device=torch_device, dtype=torch_dtype)
    model.eval()  # dropout off
    model.requires_grad_(False)
    step = int(state.get("step", _step_from_name(weights)))
    return LoadedRun(run_dir, weights, step, saved, model, data, torch_device, torch_dtype, seq_len)


def _without_cache_dir(data: Any) -> Any:
    """The run's data section with its ``cache_dir`` dropped: a run directory chooses values, not where ds_hydra
    writes, so its tokens are cached where today's defaults say ($DS_HYDRA_CACHE, else ~/.cache/ds_hydra; the
    cache is keyed by content, so the rebuilt data is the same)."""
    if isinstance(data, dict) and data.get("cache_dir") is not None:
        return {**data, "cache_dir": None}
    return data


def load_model(run: str, device: str = "cpu", dtype: str = "fp32", allowed_targets: Optional[List[str]] = None) -> nn.Module:
    """The trained model of a run directory (its newest checkpoint) or of one checkpoint file, in eval
    mode: rebuilt from the run's resolved config, weights loaded with ``weights_only=True``.

    ``allowed_targets``: module prefixes to trust for a custom model's ``_target_`` (a run directory's
    own list is not trusted)."""
    key = "load_model"
    try:
        return load_run(str(run), device, dtype, allowed_targets).model
    except UserError as exc:
        raise UserError(str(exc).replace(KEY, key)) from None


def _step_from_name(path: Path) -> int:
    found = re.search(r"(\d+)", path.stem)
    return int(found.group(1)) if found else -1


def load_weights(model: nn.Module, saved: Dict[str, Any], weights: Path, run_dir: Path) -> None:
    """``load_state_dict(strict=True)`` once every name and shape is known to fit (one error otherwise)."""
    problems = state_io.state_dict_mismatches(model, saved)
    if problems:
        raise UserError(f"{weights} does not fit the model of {run_dir / RESOLVED_CONFIG_FILE}: {'; '.join(problems)}")
    model.load_state_dict(saved, strict=True)


def output_dir(run_dir: Optional[Path], trained_run: Path) -> Path:
    """The inference invocation's own run dir; never the trained run's (its files are read-only to us)."""
    from ds_hydra.common.run_dir import resolve_run_dir

    out_dir = resolve_run_dir(run_dir)
    if out_dir.resolve() == Path(trained_run).resolve():
        raise UserError(
            f"hydra.run.dir={out_dir}: is the trained run given as inference.checkpoint; "
            "inference writes into its own run dir (leave hydra.run.dir unset)"
        )
    return out_dir
