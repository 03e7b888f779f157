"""``task=export_hf inference.checkpoint=<run dir>``: a trained run as a Hugging Face model directory.

The run's model is rebuilt from its saved config and weights (``ds_hydra.inference.loading``) and
written to ``<this run's dir>/hf_model``: ``config.json`` and ``model.safetensors``, plus the run's
tokenizer as transformers reads it (``tokenizer.json``, ``tokenizer_config.json``: every kind maps, see
``ds_hydra.data.tokenizer_export``) when the run has one. It loads with ``AutoModelForCausalLM`` and
``AutoTokenizer.from_pretrained`` and trains on with ``model=hf_causal_lm model.pretrained=<that dir>``.
Hugging Face models are saved with their own ``save_pretrained``; the built-in GPT becomes a
``GPT2LMHeadModel`` (``gpt_hf``). The directory appears whole or not at all (written beside it, then
renamed).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch.nn as nn

from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

EXPORT_DIR = "hf_model"

# Model classes (module.QualName) -> a function returning an equivalent transformers model.
CONVERTERS: Dict[str, str] = {"ds_hydra.models.gpt.GPT": "ds_hydra.models.gpt_hf:to_gpt2"}


def hf_model_of(model: nn.Module) -> nn.Module:
    """``model`` itself when it is a transformers model, else its registered conversion."""
    if callable(getattr(model, "save_pretrained", None)):
        return model
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    converter = CONVERTERS.get(name)
    if converter is None:
        raise UserError(
            f"task=export_hf: {name} has no transformers equivalent (exportable: transformers models and "
            f"{', '.join(CONVERTERS)}); save its state_dict with ds_hydra.load_model instead"
        )
    from importlib import import_module

    module, _, function = converter.partition(":")
    convert: Callable[[nn.Module], nn.Module] = getattr(import_module(module), function)
    return convert(model)


def export_hf(checkpoint: str, run_dir: Optional[Path] = None, allowed_targets: Sequence[str] = ()) -> Dict[str, Any]:
    """Write the trained run ``checkpoint`` (a run dir or one of its checkpoints: ``inference.checkpoint``)
    as a transformers model directory under ``run_dir`` (this invocation's run dir); ``allowed_targets``:
    the user's module prefixes the run's config may build from (``allowed_targets``)."""
    from ds_hydra.inference.loading import load_run, output_dir

    from ds_hydra.models.hf import import_transformers

    import_transformers()  # one line naming the extra, before anything is loaded
    run = load_run(checkpoint, "cpu", "fp32", list(allowed_targets), merge_adapter=True)
    target = output_dir(run_dir, run.run_dir) / EXPORT_DIR
    hf = hf_model_of(run.model)
    tokenizer = getattr(run.data, "tokenizer", None)  # the one the run saved (ds_hydra.data.tokenizer.adopt_run_tokenizer)
    from ds_hydra.common.files import new_dir_mode

    staging = Path(tempfile.mkdtemp(prefix=f".{EXPORT_DIR}.", dir=target.parent))
    try:
        hf.save_pretrained(str(staging), safe_serialization=True)
        if tokenizer is not None:
            from ds_hydra.data.tokenizer_export import save_for_transformers
            from ds_hydra.models.contract import max_positions

            save_for_transformers(tokenizer, staging, model_max_length=max_positions(run.model))
        staging.chmod(new_dir_mode())  # mkdtemp's 0700 would make the export unreadable to others
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "exported %s (step %d) as %s to %s; load it with AutoModelForCausalLM.from_pretrained(%r) or train on with "
        "model=hf_causal_lm model.pretrained=%s", run.checkpoint, run.step, type(hf).__name__, target, str(target), target,
    )
    if tokenizer is not None:
        log.info("with the run's %s as a transformers tokenizer: AutoTokenizer.from_pretrained(%r)", tokenizer, str(target))
    else:
        log.warning(
            "%s holds no tokenizer: the run's data are token ids without one (data=tokens without a saved tokenizer); "
            "give transformers or the harness the tokenizer those ids came from", target,
        )
    return {"export_dir": str(target), "architecture": type(hf).__name__, "step": run.step,
            "tokenizer": tokenizer.kind if tokenizer is not None else None}
