"""Schema of the ``inference`` config group (torch-free).

Field names follow DeepSpeed's inference config (``deepspeed.init_inference``) where DeepSpeed has a
name for the same knob: ``dtype``, ``max_out_tokens``, ``min_out_tokens``, ``tensor_parallel.tp_size``,
``enable_cuda_graph``, ``replace_with_kernel_inject``, ``checkpoint``. The sampling fields are
nanoGPT's ``sample.py``. Like DeepSpeed's config, unknown keys are errors (the structured config
rejects them at composition).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional


class InferenceDtype(Enum):
    """Weights and activations are cast to this type (no autocast at inference)."""

    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    # DeepSpeed's spellings of the same types
    float32 = "fp32"
    bfloat16 = "bf16"
    float16 = "fp16"
    half = "fp16"


class InferenceMode(Enum):
    generate = "generate"  # sample text from the checkpoint
    eval = "eval"  # validation loss and perplexity of the checkpoint (same as task=eval)


@dataclass
class TensorParallelConfig:
    tp_size: int = 1
    """Ranks a model is split across; only 1 (one process holds the whole model) is supported."""


@dataclass
class InferenceConfig:
    checkpoint: Optional[str] = None
    """Run directory of a trained run (or one of its checkpoints/step_*.pt files) for task=infer / task=eval."""
    mode: InferenceMode = InferenceMode.generate
    """generate (sample text) or eval (validation loss and perplexity, like task=eval)."""
    dtype: InferenceDtype = InferenceDtype.auto
    """auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16; DeepSpeed's float32/bfloat16/float16/half too."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    max_out_tokens: int = 256
    """New tokens per sample (DeepSpeed counts the prompt in it; here the prompt comes on top)."""
    max_new_tokens: Optional[int] = None
    """Alias of max_out_tokens (the Hugging Face name); when set, it wins."""
    min_out_tokens: int = 1
    """Fewest new tokens a sample must get; an error up front if max_out_tokens is smaller.
    (Our models have no end-of-text token, so every sample gets exactly max_out_tokens.)"""
    prompt: str = "\n"
    """Text the samples continue (space-separated token ids for the synthetic corpus)."""
    num_samples: int = 1
    """Samples drawn, as one batch."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy decoding."""
    top_k: Optional[int] = 200
    """Sample among the k most likely tokens (null: all)."""
    top_p: float = 1.0
    """Nucleus sampling: among the most likely tokens whose probabilities sum to top_p (1.0: all)."""
    seed: int = 1337
    """Seed of the sampler: same seed, same samples."""
    kv_cache: bool = True
    """Cache attention keys and values, so each new token costs one position instead of the whole context."""
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    """DeepSpeed's tensor-parallel group; tp_size must be 1 (one process)."""
    enable_cuda_graph: bool = False
    """torch.compile(mode="reduce-overhead") on CUDA, which replays CUDA graphs (CUDA only)."""
    replace_with_kernel_inject: bool = False
    """Accepted for DeepSpeed configs; attention already runs through fused SDPA kernels."""


def new_tokens(cfg) -> int:
    """New tokens per sample: ``max_new_tokens`` when set, else ``max_out_tokens``."""
    return cfg.max_out_tokens if cfg.max_new_tokens is None else cfg.max_new_tokens


def default_inference_config() -> Dict[str, Any]:
    """The ``inference`` group at its defaults, as a plain JSON-serialisable dict (enums as strings)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(InferenceConfig), enum_to_str=True)


def validate_inference(cfg, task: str = "train", prefix: str = "inference") -> List[str]:
    """Range checks; the checkpoint is required only when the task reads one."""
    problems = []
    if task in ("infer", "eval", "export_hf") and not cfg.checkpoint:
        problems.append(
            f"{prefix}.checkpoint is not set: task={task} needs the run directory of a trained run "
            f"({prefix}.checkpoint=outputs/<date>/<time>)"
        )
    tokens_key = "max_new_tokens" if cfg.max_new_tokens is not None else "max_out_tokens"
    tokens = new_tokens(cfg)
    if tokens < 1:
        problems.append(f"{prefix}.{tokens_key}={tokens}: must be >= 1")
    if cfg.min_out_tokens < 0:
        problems.append(f"{prefix}.min_out_tokens={cfg.min_out_tokens}: must be >= 0")
    elif tokens >= 1 and cfg.min_out_tokens > tokens:
        problems.append(
            f"{prefix}.min_out_tokens={cfg.min_out_tokens}: more than {prefix}.{tokens_key}={tokens} "
            f"new tokens can never be generated; raise {tokens_key} or lower min_out_tokens"
        )
    if cfg.num_samples < 1:
        problems.append(f"{prefix}.num_samples={cfg.num_samples}: must be >= 1")
    if cfg.temperature < 0:
        problems.append(f"{prefix}.temperature={cfg.temperature}: must be >= 0 (0 is greedy)")
    if cfg.top_k is not None and cfg.top_k < 1:
        problems.append(f"{prefix}.top_k={cfg.top_k}: must be >= 1 or null (all tokens)")
    if not 0.0 < cfg.top_p <= 1.0:
        problems.append(f"{prefix}.top_p={cfg.top_p}: must be in (0, 1] (1.0 keeps all tokens)")
    tp = cfg.tensor_parallel.tp_size
    if tp != 1:
        problems.append(
            f"{prefix}.tensor_parallel.tp_size={tp}: not supported; inference runs in one process "
            f"that holds the whole model (use 1)"
        )
    device = cfg.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        problems.append(f"{prefix}.device={device}: allowed values: auto, cpu, cuda, cuda:N")
    return problems
