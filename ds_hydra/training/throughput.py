"""Throughput accounting: model FLOPs per token, peak device FLOP/s, MFU and peak memory.

Model FLOPs per token (training: forward + backward), the estimate of the PaLM paper's appendix B
and nanoGPT's ``estimate_mfu``::

    flops_per_token = 6 * N + 12 * L * d * T

* ``6 * N``: every weight takes part in one multiply-add (2 FLOPs) per token in the forward pass and
  two in the backward pass (the gradient of the input and of the weight). ``N`` is the parameter
  count *without embedding tables used only for lookup* (the position table, an untied input
  embedding: no matmul). A token embedding tied to the output projection stays in: that matmul pays
  for it. Norm gains and biases are counted too, although they are not matmul weights (a ~0.01%
  overcount for GPT-2 124M).
* ``12 * L * d * T``: attention scores ``Q K^T`` and the weighted sum ``A V`` cost ``2 * T * d``
  FLOPs each per token and layer in the forward pass (``L`` layers, width ``d``, sequence length
  ``T``), times three for forward + backward. The whole ``T x T`` score matrix is counted, as PaLM
  and nanoGPT do, although causal kernels skip the masked half.

MFU (model FLOPs utilization) = ``flops_per_token * tokens_per_s / peak_flops``, where the peak is
the device's dense (no 2:4 sparsity) tensor-core rate at the run's precision: bf16 for bf16
autocast, fp16 for fp16, TF32 for fp32 matmuls on CUDA (the trainer enables TF32). Unknown GPUs,
CPUs and precisions without a table entry get no MFU unless ``trainer.peak_tflops`` gives the peak.
Tokens and MFU are per process (per device). ``L`` and ``d`` come from the model (the built-in GPT's
``n_layer``/``n_embd``, a Hugging Face config's layer count and hidden size); a model that states
neither is measured once with ``FlopCounterMode`` instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "GPUPeak",
    "PEAK_TFLOPS",
    "transformer_flops_per_token",
    "model_flops_per_token",
    "transformer_shape",
    "matmul_params",
    "measured_flops_per_token",
    "lookup_gpu",
    "peak_flops",
    "precision_key",
    "Throughput",
]


@dataclass(frozen=True)
class GPUPeak:
    """Dense tensor-core peaks of one GPU model in TFLOP/s (None: the GPU has no such mode)."""

    name: str
    tokens: tuple
    """Lower-case words that must all occur in ``torch.cuda.get_device_name()`` (first match wins)."""
    bf16: Optional[float]
    fp16: Optional[float]
    tf32: Optional[float]


# Vendor datasheets list tensor-core rates "with sparsity" (2:4 structured), twice the dense rate:
# these are the dense numbers. Most specific entries come first (H100 NVL before H100, L40S before L4).
# GeForce cards: fp16/bf16 with fp32 accumulation (what PyTorch uses), half the fp16-accumulate rate.
PEAK_TFLOPS = (
    GPUPeak("B200", ("b200",), 2250.0, 2250.0, 1100.0),
    GPUPeak("H200 NVL", ("h200", "nvl"), 835.5, 835.5, 417.5),
    GPUPeak("H200 SXM", ("h200",), 989.4, 989.4, 494.7),
    GPUPeak("GH200", ("gh200",), 989.4, 989.4, 494.7),
    GPUPeak("H100 NVL", ("h100", "nvl"), 835.5, 835.5, 417.5),
    GPUPeak("H100 PCIe", ("h100", "pcie"), 756.5, 756.5, 378.0),
    GPUPeak("H100 SXM", ("h100",), 989.4, 989.4, 494.7),
    GPUPeak("H800", ("h800",), 989.4, 989.4, 494.7),
    GPUPeak("A100", ("a100",), 312.0, 312.0, 156.0),
    GPUPeak("A800", ("a800",), 312.0, 312.0, 156.0),
    GPUPeak("L40S", ("l40s",), 362.1, 362.1, 183.0),
    GPUPeak("L40", ("l40",), 181.0, 181.0, 90.5),
    GPUPeak("L4", ("l4",), 121.0, 121.0, 60.0),
    GPUPeak("A10G", ("a10g",), 125.0, 125.0, 62.5),  # the A10 datasheet's rates (AWS publishes none)
    GPUPeak("A10", ("a10",), 125.0, 125.0, 62.5),
    GPUPeak("A40", ("a40",), 149.7, 149.7, 74.8),
    GPUPeak("RTX A6000", ("rtx", "a6000"), 154.8, 154.8, 77.4),
    GPUPeak("RTX 4090", ("rtx", "4090"), 165.2, 165.2, 82.6),
    GPUPeak("RTX 3090", ("rtx", "3090"), 71.0, 71.0, 35.6),
    GPUPeak("V100S PCIe", ("v100s",), None, 130.0, None),
    GPUPeak("V100 PCIe", ("v100", "pcie"), None, 112.0, None),
    GPUPeak("V100 SXM2", ("v100",), None, 125.0, None),
    GPUPeak("T4", ("t4",), None, 65.0, None),
    GPUPeak("MI300X", ("mi300x",), 1307.4, 1307.4, 653.7),
    GPUPeak("MI250X", ("mi250x",), 383.0, 383.0, None),
)


def transformer_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: ``6 * n_params + 12 * n_layer * d_model * seq_len`` (see the module doc)."""
    return 6 * n_params + 12 * n_layer * d_model * seq_len


def model_flops_per_token(model: nn.Module, seq_len: int) -> Optional[int]:
    """Training FLOPs per token of ``model`` on sequences of ``seq_len`` tokens.

    From the formula when the model states its transformer shape (``transformer_shape``), with ``N``
    the parameters that take part in matmuls (``matmul_params``); otherwise measured once with
    ``FlopCounterMode`` on a meta-device copy (no memory, no compute); None if that fails too.
    """
    shape = transformer_shape(model)
    if shape is not None:
        n_layer, d_model = shape
        return transformer_flops_per_token(matmul_params(model), n_layer, d_model, seq_len)
    return measured_flops_per_token(model, seq_len)


def transformer_shape(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(layers, width) from the model's attributes (``n_layer``, ``n_embd``: the built-in GPT) or its
    Hugging Face config (``num_hidden_layers``/``n_layer``, ``hidden_size``/``n_embd``); else None."""
    for owner in (model, getattr(model, "config", None)):
        layers = _first_int(owner, ("n_layer", "num_hidden_layers", "num_layers"))
        width = _first_int(owner, ("n_embd", "hidden_size", "d_model"))
        if layers and width:
            return layers, width
    return None


def _first_int(owner, names) -> Optional[int]:
    for name in names:
        value = getattr(owner, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a matmul: all of them but embedding tables used only for lookup
    (position tables, untied input embeddings). A table tied to an output layer stays in: that
    layer's matmul pays for it. Shared parameters count once."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookup_only = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and id(m.weight) not in linear_weights
    }
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for pid, p in unique.items() if pid not in lookup_only)


def measured_flops_per_token(model: nn.Module, seq_len: int) -> Optional[int]:
    """Forward + backward FLOPs of one (1, seq_len) sequence on a meta copy of ``model``, per token."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from ds_hydra.loss.cross_entropy import CrossEntropyLoss
    from ds_hydra.loss.step import mean_loss

    try:
        meta = copy.deepcopy(model).to_empty(device="meta")
        ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as counter:
            # the plain loss whatever loss= the run uses: a chunked loss's recomputed logits are not model FLOPs
            mean_loss(meta, CrossEntropyLoss(), {"input_ids": ids, "labels": ids}).backward()
        return int(counter.get_total_flops()) // seq_len
    except Exception:  # noqa: BLE001  (a model the meta device cannot run: no MFU, training goes on)
        return None


def lookup_gpu(device_name: str) -> Optional[GPUPeak]:
    """The table entry whose words all occur in ``device_name`` (e.g. "NVIDIA H100 80GB HBM3")."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    for entry in PEAK_TFLOPS:
        if all(token in words for token in entry.tokens):
            return entry
    return None


def precision_key(autocast_dtype: Optional[torch.dtype]) -> str:
    """The table column of a run's matmuls: bf16, fp16, tf32 (fp32 with TF32 enabled) or fp32."""
    if autocast_dtype == torch.bfloat16:
        return "bf16"
    if autocast_dtype == torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(
    device: torch.device, autocast_dtype: Optional[torch.dtype], override_tflops: Optional[float] = None
) -> Optional[float]:
    """Peak dense FLOP/s of ``device`` at the run's precision; None when unknown (CPU, unlisted GPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    entry = lookup_gpu(torch.cuda.get_device_name(device))
    tflops = getattr(entry, precision_key(autocast_dtype), None) if entry is not None else None
    return tflops * 1e12 if tflops else None


class Throughput:
    """Turns a timed window of steps into the throughput metrics the trainer logs.

    ``metrics(tokens_per_s)`` gives ``tokens_per_s``, ``mfu`` (when the peak is known) and
    ``peak_memory_gib`` (CUDA only: ``torch.cuda.max_memory_allocated`` since the run began).
    """

    def __init__(self, flops_per_token: Optional[int], peak: Optional[float], device: torch.device):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak
        self.device = device

    @classmethod
    def for_model(
        cls, model: nn.Module, seq_len: int, device: torch.device, autocast_dtype: Optional[torch.dtype],
        peak_tflops: Optional[float] = None,
    ) -> "Throughput":
        return cls(model_flops_per_token(model, seq_len), peak_flops(device, autocast_dtype, peak_tflops), device)

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        if not (self.flops_per_token and self.peak_flops):
            return None
        return self.flops_per_token * tokens_per_s / self.peak_flops

    def peak_memory_gib(self) -> Optional[float]:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def metrics(self, tokens_per_s: float) -> Dict[str, float]:
        out = {"tokens_per_s": tokens_per_s}
        mfu = self.mfu(tokens_per_s)
        if mfu is not None:
            out["mfu"] = mfu
        memory = self.peak_memory_gib()
        if memory is not None:
            out["peak_memory_gib"] = memory
        return out
