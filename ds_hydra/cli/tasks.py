"""The tasks whose work is done by a component that takes slices of the config, never the whole of it:
each function here cuts those slices from the composed config (``TASKS`` in ``ds_hydra.cli`` names them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional


def prepare_task(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``task=prepare``: the whole of the ``prepare`` config with the ``tokenizer`` config (and
    ``model.pretrained``, whose tokenizer an hf tokenizer may be); returns a summary."""
    from omegaconf import OmegaConf

    from ds_hydra.data import prepare_inputs
    from ds_hydra.data.prepare import prepare_dataset
    from ds_hydra.data.prepare_config import input_patterns
    from ds_hydra.data.prepare_inputs import ReadSettings

    pcfg = cfg.prepare  # validated with the rest of the config (ds_hydra.validation)
    files = prepare_inputs.resolve_inputs(input_patterns(pcfg.input), pcfg.format.value)
    model = cfg.get("model") or {}
    return prepare_dataset(
        files,
        Path(pcfg.output).expanduser(),
        OmegaConf.to_container(cfg.tokenizer, resolve=True),
        ReadSettings(text_field=pcfg.text_field, errors=pcfg.errors.value),
        train_fraction=1.0 - pcfg.val_fraction,
        num_proc=pcfg.num_proc,
        chunk_bytes=pcfg.chunk_bytes,
        force=pcfg.force,
        pretrained=model.get("pretrained", None),
    )


def export_hf_task(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``task=export_hf``: the run named by ``inference.checkpoint``, under ``allowed_targets``."""
    from ds_hydra.inference.export_hf import export_hf

    return export_hf(cfg.inference.checkpoint, run_dir, allowed_targets=list(cfg.get("allowed_targets") or []))
