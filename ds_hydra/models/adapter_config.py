"""Schema of the ``adapter`` config group and its checks (torch-free: imported by the ConfigStore registration).

``adapter=lora`` (or ``dora``) freezes the model's weights and trains small low-rank matrices beside
the chosen linear layers (``peft``'s LoRA and DoRA, ``pip install 'ds-hydra[peft]'``); ``adapter=none``
trains every weight. ``model.quantize`` (nf4, int8) stores the frozen base weights quantized (QLoRA),
which needs an adapter: a quantized weight cannot train.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, List


class AdapterName(Enum):
    none = "none"  # train every weight of the model
    lora = "lora"  # low-rank adapters (Hu et al. 2021) beside the target layers; the base is frozen
    dora = "dora"  # LoRA plus a trained per-output magnitude (Liu et al. 2024)


class Quantize(Enum):
    none = "none"  # weights in model.dtype
    nf4 = "nf4"  # 4-bit NormalFloat in blocks of 64, the scales quantized again (bitsandbytes; QLoRA's double quantization)
    int8 = "int8"  # 8-bit rows with an fp32 scale each (bitsandbytes' LLM.int8 weights)


ALL_LINEAR = "all-linear"


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning: which adapter trains, and where."""

    name: AdapterName = AdapterName.none
    """none (every weight trains), lora or dora (only the adapters train; the model's weights are frozen)."""
    r: int = 8
    """Rank of each adapter: A is (r, in_features), B is (out_features, r)."""
    alpha: float = 16.0
    """Scale of the adapter's output: alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (0: none)."""
    target_modules: Any = None
    """Module names to adapt: a list matched against the end of each module's dotted name (``[q_proj, v_proj]``),
    or ``all-linear`` (every linear layer but the output head); null: peft's default for the architecture
    (Llama: q_proj, v_proj; GPT-2: c_attn; the built-in GPT: qkv). A model without a default needs a list."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)."""


def adapter_on(adapter_cfg) -> bool:
    """Whether ``adapter_cfg`` (the ``adapter`` node, or None) trains an adapter."""
    if adapter_cfg is None:
        return False
    return str(getattr(adapter_cfg.get("name"), "value", adapter_cfg.get("name"))) not in ("none", "None")


def quantize_of(model_cfg) -> str:
    """``model.quantize`` as a string (none when the model node has no such key)."""
    value = model_cfg.get("quantize", None) if model_cfg is not None else None
    return "none" if value is None else str(getattr(value, "value", value))


def validate_adapter(adapter_cfg, model_cfg=None, engine_cfg=None, prefix: str = "adapter") -> List[str]:
    """Range checks, ``model.quantize`` without an adapter (quantized weights cannot train), and engines
    that cannot keep an adapter run's checkpoints (DeepSpeed saves its own whole-model shards)."""
    problems: List[str] = []
    quantize = quantize_of(model_cfg)
    if quantize not in [q.value for q in Quantize]:
        problems.append(f"model.quantize={quantize}: allowed values: {', '.join(q.value for q in Quantize)}")
    elif quantize != "none" and not adapter_on(adapter_cfg):
        problems.append(
            f"model.quantize={quantize}: would quantize weights that train (adapter=none trains every weight); "
            f"add adapter=lora (QLoRA: the quantized base stays frozen) or set model.quantize=none"
        )
    if not adapter_on(adapter_cfg):
        return problems
    engine = str(getattr(engine_cfg.get("name"), "value", engine_cfg.get("name"))) if engine_cfg is not None else "auto"
    if engine == "deepspeed":
        problems.append(f"{prefix}.name={adapter_cfg.name.value if hasattr(adapter_cfg.name, 'value') else adapter_cfg.name}: "
                        f"not with engine=deepspeed (its checkpoints hold the whole model); use engine=ddp or engine=fsdp")
    if adapter_cfg.r < 1:
        problems.append(f"{prefix}.r={adapter_cfg.r}: must be >= 1")
    if not 0.0 <= adapter_cfg.dropout < 1.0:
        problems.append(f"{prefix}.dropout={adapter_cfg.dropout}: must be in [0, 1)")
    targets = adapter_cfg.get("target_modules")
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            problems.append(f"{prefix}.target_modules={targets}: a list of module names ([q_proj,v_proj]) or {ALL_LINEAR}")
    elif targets is not None and (len(targets) == 0 or not all(isinstance(t, str) and t for t in targets)):
        problems.append(f"{prefix}.target_modules: give module names ([q_proj,v_proj]), {ALL_LINEAR}, or null (the architecture's default)")
    return problems


__all__ = ["AdapterConfig", "AdapterName", "Quantize", "ALL_LINEAR", "adapter_on", "quantize_of", "validate_adapter"]
