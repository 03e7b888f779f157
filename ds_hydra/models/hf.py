"""Hugging Face ``transformers`` causal LMs as ds_hydra models (``model=hf_causal_lm``, ``hf_llama``, ``hf_gpt2``).

``causal_lm`` builds the model one of two ways, never touching the network:

* from ``config``: a mapping with ``model_type`` (``llama``, ``gpt2``, ...) and that architecture's
  fields, through ``AutoModelForCausalLM.from_config`` (random initialisation);
* from ``pretrained``: a local directory with ``config.json`` and ``model.safetensors`` (what
  ``save_pretrained`` and ``task=export_hf`` write), loaded with ``local_files_only=True``.

The model is returned as it is (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...): its forward already
meets the model contract (``model(input_ids).logits``), its decoder layers form the block list that
activation checkpointing, compile and FSDP use, and its ``config`` tells the trainer its maximum
positions, vocabulary and shape. Training needs no KV cache, so ``use_cache`` is off in the config
(``generate`` still caches: it asks for one itself).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch.nn as nn

from ds_hydra.errors import UserError
from ds_hydra.common.remote_code import refuse_remote_code

log = logging.getLogger(__name__)

EXTRA = "pip install 'ds-hydra[hf]'"
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def import_transformers():
    """``transformers``, or one line naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"model: Hugging Face models need the transformers package: {EXTRA}") from None
    if not transformers.utils.is_torch_available():  # transformers 5 turns its models off below torch 2.6
        import torch

        raise UserError(
            f"model: transformers {transformers.__version__} does not run on torch {torch.__version__} (it turned its "
            f"PyTorch models off); install a transformers that does, e.g. pip install 'transformers<5' for torch < 2.6"
        )
    return transformers


def causal_lm(
    config: Optional[Mapping[str, Any]] = None,
    pretrained: Optional[str] = None,
    vocab_size: Optional[int] = None,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A ``transformers`` causal LM from ``config`` (random init) or a local ``pretrained`` directory.

    ``vocab_size``: the data's vocabulary, used when ``config`` does not set one (a pretrained model
    keeps its own). ``dtype``: the parameters' dtype (fp32 keeps fp32 master weights; mixed precision
    is ``trainer.precision``).
    """
    transformers = import_transformers()
    import torch

    dtype = getattr(dtype, "value", dtype)  # the schema's enum, or its name
    if dtype not in DTYPES:
        raise UserError(f"model.dtype={dtype}: allowed values: {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, DTYPES[dtype])
    if pretrained:
        return _from_pretrained(transformers, pretrained, torch_dtype, attn_implementation, config)
    hf_config = build_config(transformers, dict(config or {}), vocab_size)
    hf_config.use_cache = False
    return transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation=attn_implementation, trust_remote_code=False,
        **_dtype_argument(transformers, torch_dtype),
    )


def _dtype_argument(transformers, torch_dtype) -> Dict[str, Any]:
    """transformers 4.56 renamed ``torch_dtype`` to ``dtype`` (and later dropped the old name)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype}


def build_config(transformers, fields: Dict[str, Any], vocab_size: Optional[int]):
    """The architecture's config object from ``model.config``; problems name the key."""
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise UserError("model.config.model_type: missing; name the architecture, e.g. model.config.model_type=llama")
    known = sorted(transformers.CONFIG_MAPPING.keys())
    if model_type not in known:
        import difflib

        close = difflib.get_close_matches(str(model_type), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"model.config.model_type={model_type}: not a transformers architecture{hint}")
    if fields.get("vocab_size") is None and vocab_size is not None:
        fields["vocab_size"] = int(vocab_size)
    config_class = transformers.CONFIG_MAPPING[model_type]
    unknown = _unknown_config_keys(config_class, fields)
    if unknown:
        raise UserError(
            f"model.config.{unknown[0]}: {config_class.__name__} has no such field; see its documentation for the "
            f"fields of model_type={model_type}"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model.config: {config_class.__name__} refused it ({_one_line(exc)})") from None


def _unknown_config_keys(config_class, fields: Mapping[str, Any]) -> List[str]:
    """Keys the architecture's config neither declares nor inherits (a typo would otherwise be kept silently)."""
    import inspect

    accepted = set()
    for cls in config_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            accepted |= set(inspect.signature(init).parameters)
        accepted |= set(getattr(cls, "__annotations__", {}))
        accepted |= set(getattr(cls, "attribute_map", {}))
    accepted |= set(vars(config_class()).keys())
    return [k for k in fields if k not in accepted]


def _from_pretrained(transformers, pretrained: str, torch_dtype, attn_implementation: str, config: Optional[Mapping]):
    folder = Path(pretrained).expanduser()
    key = f"model.pretrained={pretrained}"
    if not folder.is_dir():
        raise UserError(f"{key}: no such directory (give a local model directory with config.json and model.safetensors)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}: no config.json there, so not a transformers model directory")
    if not any((folder / name).is_file() for name in WEIGHTS_FILES):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise UserError(
            f"{key}: no model.safetensors there (found: {', '.join(found) or 'nothing'}); ds_hydra loads safetensors "
            f"weights only (save the model with save_pretrained, or task=export_hf)"
        )
    if config:
        raise UserError(f"model.config: set with {key}; the directory's config.json defines the model (drop model.config)")
    refuse_remote_code(folder, key, transformers.CONFIG_MAPPING.keys())  # before transformers could prompt on stdin
    if _shapes_only():  # task=validate, the memory preflight: the architecture is enough, the weights are not read
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        hf_config.use_cache = False
        return transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=attn_implementation, trust_remote_code=False,
            **_dtype_argument(transformers, torch_dtype),
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, attn_implementation=attn_implementation, use_safetensors=True,
            trust_remote_code=False, **_dtype_argument(transformers, torch_dtype),
        )
    except Exception as exc:  # a config/weights mismatch, a damaged file, an unknown architecture
        raise UserError(f"{key}: cannot load it ({_one_line(exc)})") from None
    model.config.use_cache = False
    log.info("loaded %s (%s) from %s", type(model).__name__, model.config.model_type, folder)
    return model


def _shapes_only() -> bool:
    """Whether the model is being built for its shapes alone: on the meta device or under FakeTensorMode."""
    import torch

    probe = torch.empty(0)
    return probe.device.type == "meta" or type(probe).__name__ == "FakeTensor"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
