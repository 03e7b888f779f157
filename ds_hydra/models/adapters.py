"""Adapters (LoRA, DoRA) on a frozen, optionally quantized base: applied where the model is built.

``adapt_model(model, model_cfg, adapter_cfg)`` is the one transform that turns a built model into what
trains: with ``model.quantize`` it replaces the base's linear layers by bitsandbytes' 4-bit (nf4) or
8-bit (int8) layers, frozen; then peft's ``inject_adapter_in_model`` puts LoRA (or DoRA) layers around
the target modules in place: the model keeps its class, its blocks and its parameter names (the
adapted layer's weight moves to ``<name>.base_layer.weight``; the adapters are
``<name>.lora_A.default.weight`` and ``<name>.lora_B.default.weight``), so activation checkpointing,
compile and the engines see the same model as without adapters, and only the adapters require grad.

The model builder calls it (``ds_hydra.models.build.build_model``), so the trainer, the memory preflight
and the loaders of a trained run all see the same frozen and trainable parameters.

A run with an adapter keeps only what trains: checkpoints hold the trainable parameters
(``trainable_state``), ``<run>/adapter/`` holds them in PEFT's format (``save_adapter_dir``), which
``peft.PeftModel.from_pretrained(base, <run>/adapter)`` loads; ``merge_adapters`` folds them into the
base weights for ``task=export_hf``.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn as nn

from ds_hydra.errors import UserError
from ds_hydra.models.adapter_config import ALL_LINEAR, adapter_on, quantize_of

log = logging.getLogger(__name__)

PEFT_EXTRA = "pip install 'ds-hydra[peft]'"
QUANT_EXTRA = "pip install 'ds-hydra[quant]'"
ADAPTER_DIR = "adapter"  # <run dir>/adapter: adapter_config.json + adapter_model.safetensors (PEFT's format)
ADAPTER_NAME = "default"  # peft's name of the one adapter
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the base model's names, as PEFT files store them
# The built-in GPT's default targets: its fused query/key/value projection, as peft's default for GPT-2 (c_attn).
GPT_DEFAULT_TARGETS = ["qkv"]


def import_peft():
    """``peft``, or one line naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise UserError(f"adapter: LoRA and DoRA adapters need the peft package: {PEFT_EXTRA}") from None
    return peft


def import_bitsandbytes(mode: str):
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"model.quantize={mode}: quantized weights need the bitsandbytes package: {QUANT_EXTRA}") from None
    return bitsandbytes


# -- building ------------------------------------------------------------------------------------
def adapt_model(model: nn.Module, model_cfg, adapter_cfg) -> nn.Module:
    """``model`` with its base quantized (``model.quantize``) and the adapter of ``adapter_cfg`` injected,
    in place; ``model`` unchanged when neither is set. Only adapter parameters require grad afterwards."""
    quantize = quantize_of(model_cfg)
    if not adapter_on(adapter_cfg):
        if quantize != "none":  # validation says so first; a direct caller gets the same line
            raise UserError(
                f"model.quantize={quantize}: would quantize weights that train (adapter=none trains every weight); "
                f"add adapter=lora (QLoRA) or set model.quantize=none"
            )
        return model
    peft = import_peft()
    targets = target_modules(model, adapter_cfg)
    model.requires_grad_(False)  # the base is frozen; peft marks its adapters trainable
    if quantize != "none":
        quantize_linear_layers(model, quantize)
    name = str(getattr(adapter_cfg.name, "value", adapter_cfg.name))
    config = peft.LoraConfig(
        r=int(adapter_cfg.r),
        lora_alpha=float(adapter_cfg.alpha),
        lora_dropout=float(adapter_cfg.dropout),
        target_modules=targets,
        use_rslora=bool(adapter_cfg.use_rslora),
        use_dora=name == "dora",
        bias="none",
        task_type="CAUSAL_LM" if _is_transformers_model(model) else None,
        base_model_name_or_path=_pretrained_dir(model_cfg),
    )
    with _moves_skipped_when_shapes_only():
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    _embeddings_require_grad(model)
    return model


def _embeddings_require_grad(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, as transformers' ``enable_input_require_grads`` does:
    with a frozen embedding table no block input would, and reentrant activation checkpointing
    (``ckpt.use_reentrant=true``) then returns outputs without a graph, dropping the adapters' gradients.
    Backward already passes through every block down to the first adapter; one step more costs nothing."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        embedding.register_forward_hook(_output_requires_grad)


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _moves_skipped_when_shapes_only():
    """When the model is built for its shapes only (the memory preflight's FakeTensorMode, validate's meta
    device), the adapters are created where their base layer is already, and peft's moves of them onto that
    device are skipped: torch cannot swap a fake parameter for itself (``Couldn't swap Linear.weight``)."""
    import contextlib
    from unittest import mock

    from ds_hydra.models.hf import _shapes_only

    if not _shapes_only():
        return contextlib.nullcontext()
    return mock.patch.object(nn.Module, "to", lambda self, *args, **kwargs: self)


def _is_transformers_model(model: nn.Module) -> bool:
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def _pretrained_dir(model_cfg) -> Optional[str]:
    value = model_cfg.get("pretrained") if model_cfg is not None else None
    return str(value) if value else None


def linear_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Every linear layer by its dotted name (``nn.Linear`` and its subclasses, transformers' ``Conv1D``)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            found[name] = module
    return found


def output_layer_names(model: nn.Module) -> Set[str]:
    """The output head: what ``get_output_embeddings()`` returns, or a linear layer sharing its weight with
    an embedding (a tied head), or a module named ``lm_head``."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in linear_modules(model).items():
        if module is head or id(getattr(module, "weight", None)) in embedded or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's whole name, or its end after a dot."""
    return name == target or name.endswith("." + target)


def target_modules(model: nn.Module, adapter_cfg) -> List[str]:
    """The target names of ``adapter_cfg`` for ``model``, each matching at least one module.

    ``all-linear`` becomes the full names of every linear layer but the output head (peft's own rule for
    transformers models, applied to any model); null becomes the architecture's default."""
    configured = adapter_cfg.get("target_modules")
    linear = linear_modules(model)
    if configured == ALL_LINEAR:
        heads = output_layer_names(model)
        names = [name for name in linear if name not in heads]
        if not names:
            raise UserError(f"adapter.target_modules={ALL_LINEAR}: {type(model).__name__} has no linear layer besides its output head")
        return names
    if configured is None:
        targets = default_targets(model)
        if targets is None:
            raise UserError(
                f"adapter.target_modules: {type(model).__name__} has no default targets; name its modules, e.g. "
                f"adapter.target_modules=[{','.join(_leaf_names(linear)[:2])}] or {ALL_LINEAR} (its linear layers: "
                f"{', '.join(_leaf_names(linear)) or 'none'})"
            )
    else:
        targets = [str(t) for t in configured]
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        shown = _leaf_names(linear) or sorted({n.split(".")[-1] for n in names})
        raise UserError(
            f"adapter.target_modules={targets}: {', '.join(unmatched)} matches no module of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(shown)} (or use {ALL_LINEAR})"
        )
    return targets


def _leaf_names(modules: Dict[str, nn.Module]) -> List[str]:
    """The distinct last parts of dotted names, in model order (``q_proj, k_proj, ...``)."""
    return list(dict.fromkeys(name.split(".")[-1] for name in modules if name))


def default_targets(model: nn.Module) -> Optional[List[str]]:
    """peft's default target modules for a transformers architecture; ``qkv`` for the built-in GPT."""
    from ds_hydra.models.gpt import GPT

    if isinstance(model, GPT):
        return list(GPT_DEFAULT_TARGETS)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    found = DEFAULTS.get(model_type)
    return list(found) if found else None


# -- quantized base --------------------------------------------------------------------------------
def quantize_linear_layers(model: nn.Module, mode: str) -> int:
    """Replace every linear layer but the output head by a frozen bitsandbytes layer whose weight is stored
    in ``mode`` (nf4: 4-bit NormalFloat in blocks of 64; int8: 8-bit rows), computing in the weight's own
    dtype; returns how many were replaced. Marks the model as peft expects a quantized transformers model
    (``is_loaded_in_4bit``/``is_loaded_in_8bit``), so peft wraps these layers in its quantized LoRA layers."""
    bnb = import_bitsandbytes(mode)
    heads = output_layer_names(model)
    replaced = 0
    for name, module in list(linear_modules(model).items()):
        if type(module) in _bnb_layers(bnb):  # quantized already, as the base was materialised (quantized_load)
            replaced += 1
            continue
        if name in heads or type(module) is not nn.Linear:  # the head stays; Conv1D and subclasses are left as they are
            continue
        if module.weight.requires_grad:
            raise UserError(f"model.quantize={mode}: {name}.weight trains; only frozen weights can be stored quantized")
        _set_submodule(model, name, _quantized(bnb, module, mode))
        replaced += 1
    if not replaced:
        raise UserError(f"model.quantize={mode}: {type(model).__name__} has no linear layer to quantize besides its output head")
    if mode == "int8":  # bitsandbytes says so at every call of every layer; said once here instead
        warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast from")
        log.info("model.quantize=int8: bitsandbytes multiplies int8 weights by inputs cast to float16")
    setattr(model, "is_loaded_in_4bit" if mode == "nf4" else "is_loaded_in_8bit", True)
    log.info("model.quantize=%s: %d linear layers stored quantized", mode, replaced)
    return replaced


def _bnb_layers(bnb) -> tuple:
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def _quantized(bnb, linear: nn.Linear, mode: str) -> nn.Module:
    from ds_hydra.models.hf import _shapes_only

    if _shapes_only():  # fake or meta tensors: bitsandbytes cannot quantize them
        return ShapesOnlyQuantizedLinear(linear, mode)
    weight = linear.weight.detach()
    device = weight.device
    has_bias = linear.bias is not None
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=weight.dtype, quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    elif mode == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise UserError(f"model.quantize={mode}: allowed values: none, nf4, int8")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes the weight when it is moved to its device


class ShapesOnlyQuantizedLinear(nn.Linear):
    """What a bitsandbytes layer stores and allocates, for a model built for its shapes only (the memory
    preflight's FakeTensorMode, validate's meta device), where bitsandbytes cannot run: the packed weight
    (nf4: half a byte per weight, int8: one) and its scales (nf4: one byte per 64 weights, the scales
    quantized again; int8: an fp32 scale per row), frozen; forward and backward each dequantize the weight
    into a temporary of the compute dtype, as bitsandbytes does, and keep nothing for backward."""

    def __init__(self, linear: nn.Linear, mode: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        count = self.in_features * self.out_features
        device = linear.weight.device
        if mode == "nf4":
            packed = torch.empty((count + 1) // 2, 1, dtype=torch.uint8, device=device)
            scales = torch.empty(-(-count // 64), dtype=torch.uint8, device=device)
        else:
            packed = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device)
            scales = torch.empty(self.out_features, dtype=torch.float32, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, (self.out_features, self.in_features), self.compute_dtype)
        return y + self.bias if self.bias is not None else y


class _DequantizedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shape, dtype) -> torch.Tensor:  # x @ W.T with W a temporary
        ctx.shape, ctx.dtype = shape, dtype
        return torch.nn.functional.linear(x, x.new_empty(shape, dtype=dtype).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ grad.new_empty(ctx.shape, dtype=ctx.dtype).to(grad.dtype), None, None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# -- what a run keeps ----
def base_in_run_dir(model_cfg, init_from: Optional[str] = None) -> bool:
    """Whether an adapter run keeps its frozen base in its run dir (``ds_hydra.training.adapter_base``), written once: when no
    ``model.pretrained`` directory holds it as it trains (a random initialisation, ``trainer.init_from``'s weights)."""
    return _pretrained_dir(model_cfg) is None or bool(init_from)


def is_adapted(model: nn.Module) -> bool:
    """Whether peft adapter layers sit in ``model``."""
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def trainable_names(model: nn.Module) -> List[str]:
    """Names of the parameters that train (with an adapter: only the adapters'), in model order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of ``state`` (the model's full state dict) that train."""
    names = set(trainable_names(model))
    return {k: v for k, v in state.items() if k in names}


def check_trainable_state(model: nn.Module, saved: Dict[str, Any], where: str) -> None:
    """Refuse saved adapter weights whose names or shapes differ from ``model``'s trainable parameters."""
    params = dict(model.named_parameters())
    expected = trainable_names(model)
    missing = [n for n in expected if n not in saved]
    unexpected = [n for n in saved if n not in params or not params[n].requires_grad]
    wrong = [n for n in expected if n in saved and tuple(saved[n].shape) != tuple(params[n].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} adapter weights (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights this model does not train (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"shape of {wrong[0]}: {tuple(saved[wrong[0]].shape)} saved, {tuple(params[wrong[0]].shape)} here")
    if problems:
        raise UserError(f"{where} does not fit this model's adapter (another adapter.r or target_modules?): {'; '.join(problems)}")


def load_trainable_state(model: nn.Module, saved: Dict[str, Any], where: str) -> None:
    """Load saved adapter weights into ``model`` (one process, unwrapped); the frozen base is left as it is."""
    check_trainable_state(model, saved, where)
    model.load_state_dict(saved, strict=False)


def peft_state(model: nn.Module, trainable: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The adapter weights under the names of PEFT's files (``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=dict(trainable), adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter_dir(model: nn.Module, trainable: Dict[str, Any], run_dir: Path) -> Path:
    """Write ``<run_dir>/adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``) whole or not at
    all: written beside it, then swapped in."""
    from safetensors.torch import save_file

    target = Path(run_dir) / ADAPTER_DIR
    config = model.peft_config[ADAPTER_NAME]
    staging = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}.", dir=run_dir))
    try:
        save_file(peft_state(model, trainable), str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}.old.", dir=run_dir))
            target.rename(old / ADAPTER_DIR)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def unpacked_numel(param: torch.Tensor) -> int:
    """The parameters a weight stands for: a bitsandbytes 4-bit weight packs two in a byte (its quant_state
    holds the shape it was quantized from)."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def adapter_summary(model: nn.Module) -> str:
    """``trainable 0.29M of 1.06M parameters (27.4%): lora r=8 on q_proj, v_proj`` (a 13B base: ``of 13,015.86M``)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(unpacked_numel(p) for p in model.parameters())
    config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    kind = "dora" if getattr(config, "use_dora", False) else "lora"
    targets = sorted({t.split(".")[-1] for t in (config.target_modules or [])}) if config is not None else []
    return (f"trainable {trainable / 1e6:,.2f}M of {total / 1e6:,.2f}M parameters ({trainable / max(total, 1):.1%}): "
            f"{kind} r={getattr(config, 'r', '?')} on {', '.join(targets)}")


# -- merging -----------------------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weight (W + scale * B A; DoRA: its magnitude too) and put the
    base layer back in its place, in place: the model is the base architecture again, as peft's
    ``merge_and_unload`` leaves it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in names:
        layer = model.get_submodule(name)
        layer.merge(adapter_names=[ADAPTER_NAME])
        _set_submodule(model, name, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return model

