"""The memory preflight: a run's step estimated from its config, compared with the device's free memory.

Before anything heavy is built (in ``Preflight`` for a CLI run, which hands its verdict to ``train``;
at the start of ``train`` otherwise), ``check_step_memory(cfg)`` estimates one training step with
``memory_estimate`` and compares it with what the device has free (host memory on the CPU, shared
by the ranks of a launch on one host; GPU memory on CUDA):

* more than ``REFUSE_ABOVE`` times the free memory (the estimate is within 15%, so even 15% less
  would not fit): refused in one line with the estimate, what dominates it and the knob to turn;
* more than ``WARN_ABOVE`` of it: a warning that it may not fit;
* else one info line with the estimate.

``run.memory_check=warn`` only warns, ``off`` skips it. ``step_spec`` is the adapter from the config
to the generic estimator: it builds the run's model (``cfg.model``, any model of the contract in
``ds_hydra.models.contract``) on a batch of ``(trainer.batch_size, seq_len)`` tokens whose loss is the
trainer's loss (the ``loss`` group, through ``ds_hydra.loss.step.loss_sum``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from ds_hydra.common import launch_env
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

ERROR_MARGIN = 0.15  # bench/memory.py: estimates within 15% of the measured step peak
REFUSE_ABOVE = 1 / (1 - ERROR_MARGIN)  # even an estimate 15% too high would not fit
WARN_ABOVE = 1 - ERROR_MARGIN



@dataclass
class MemoryVerdict:
    estimate: "object"  # memory_estimate.StepMemory
    free: Optional[int]
    source: str
    device: str
    level: int  # logging level of the line
    line: str


def step_spec(cfg):
    """The ``StepSpec`` of ``cfg``'s training step on its device."""
    import torch

    from ds_hydra.training.slices import vocab_size_of
    from ds_hydra.devices import resolve_device, resolve_precision
    from ds_hydra.models.build import build_model
    from ds_hydra.loss.step import build_loss, mean_loss
    from ds_hydra.optim.build import kernel_kwargs, optimizer_callable
    from ds_hydra.training.memory_estimate import Knobs, StepSpec
    from omegaconf import OmegaConf

    device = resolve_device(cfg.trainer.device)
    vocab_size, _ = vocab_size_of(cfg)
    make_optimizer = optimizer_callable(cfg.optimizer, torch.device("cpu"))  # probed on the CPU for its state's size
    kernels = {**make_optimizer.keywords, **kernel_kwargs(make_optimizer.func, make_optimizer.keywords, device)}
    shape = (int(cfg.trainer.batch_size), seq_len_of(cfg, vocab_size))
    model_cfg, stored_bytes = _quantized_base(cfg.model)
    loss_fn = build_loss(cfg.get("loss"))
    return StepSpec(
        build_model=lambda: build_model(model_cfg, vocab_size, cfg.get("adapter")),  # frozen base, adapters trainable
        example_batch=lambda dev: (torch.zeros(shape, dtype=torch.long, device=dev),) * 2,  # (input_ids, labels)
        loss=lambda model, batch: mean_loss(model, loss_fn, {"input_ids": batch[0], "labels": batch[1]}),  # the trainer's loss step
        device=device,
        ckpt=OmegaConf.to_container(cfg.ckpt, resolve=True),
        make_optimizer=make_optimizer,
        optimizer_in_backward=bool(cfg.trainer.get("optimizer_in_backward", False)),
        optimizer_step="fused" if kernels.get("fused") else "foreach" if kernels.get("foreach") else "loop",
        autocast_dtype=resolve_precision(getattr(cfg.trainer.precision, "value", cfg.trainer.precision), device),
        grad_accum_steps=int(cfg.trainer.grad_accum_steps),
        stored_bytes=stored_bytes,
        stored_as_loaded=quantized_as_loaded(cfg),
        sharding=sharding_of(cfg.engine),
        knobs=Knobs(seq_len=seq_len_key(cfg), head_chunk="model.head_chunk_tokens" if "head_chunk_tokens" in cfg.model else None),
    )


def quantized_as_loaded(cfg) -> bool:
    """Whether the trainer quantizes the base block by block as it reads or initialises it (a transformers
    model, from ``model.pretrained`` or ``model.config``, with nothing else loaded into it:
    ``ds_hydra.models.quantized_load``), not after building it whole."""
    from ds_hydra.models.adapter_config import adapter_on
    from ds_hydra.models.config import HF_TARGET

    return adapter_on(cfg.get("adapter")) and not cfg.trainer.get("init_from") and str(cfg.model.get("_target_")) == HF_TARGET


NF4_MAPS = 4 * (16 + 256 + 1)  # per nf4 weight: its 16-value code, the nested statistics' 256-value code, an offset


def _quantized_base(model_cfg):
    """(the model config the estimate builds, the bytes of its quantized weights by name or None).

    bitsandbytes' quantized parameters cannot be made of fake tensors, so with ``model.quantize`` the
    estimate builds the base plain and counts each weight ``quantize_linear_layers`` would replace (the
    frozen linear weights but the output head's) at the bytes bitsandbytes stores it in: nf4 packs two
    weights a byte plus a uint8 scale per 64 and an fp32 one per 16,384 (nested statistics) and its
    code tables; int8 one
    byte a weight plus an fp32 scale per output row. Their dequantized copies in forward and backward
    are one layer's at a time."""
    from ds_hydra.models.adapter_config import quantize_of

    mode = quantize_of(model_cfg)
    if mode == "none":
        return model_cfg, None
    from omegaconf import OmegaConf, open_dict

    plain = model_cfg.copy()
    with open_dict(plain):
        OmegaConf.update(plain, "quantize", "none", force_add=True)

    def stored_bytes(model) -> dict:
        import torch.nn as nn

        from ds_hydra.models.adapters import output_layer_names

        heads = output_layer_names(model)
        sizes = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name not in heads and not module.weight.requires_grad:
                n, rows = module.weight.numel(), module.weight.shape[0]
                sizes[f"{name}.weight"] = (-(-n // 2) + -(-n // 64) + 4 * -(-n // 16384) + NF4_MAPS if mode == "nf4" else n + 4 * rows)
        return sizes

    return plain, stored_bytes


def seq_len_key(cfg) -> str:
    """The key that sets the sequence length: ``data.seq_len``, or when it is null the model's own length
    (``model.block_size`` for the built-in GPT)."""
    if cfg.data.get("seq_len", None) is None and "block_size" in cfg.model:
        return "model.block_size"
    return "data.seq_len"


def seq_len_of(cfg, vocab_size: int) -> int:
    """The run's sequence length: ``data.seq_len``, else the model's maximum positions (other models than the
    built-in GPT are asked, built on the meta device: no memory)."""
    from ds_hydra.models.config import GPT_TARGET

    if cfg.data.get("seq_len", None):
        return int(cfg.data.seq_len)
    if cfg.model.get("_target_") == GPT_TARGET:  # the built-in GPT's length is its block_size: nothing to build
        return int(cfg.model.block_size)
    import torch

    from ds_hydra.models.build import build_model
    from ds_hydra.models.contract import max_positions

    with torch.device("meta"):
        limit = max_positions(build_model(cfg.model, vocab_size))
    if limit is None:
        raise UserError("data.seq_len: the model does not say how long a sequence it takes; set data.seq_len=<tokens per sequence>")
    return limit


def sharding_of(engine):
    """How ``engine`` splits state over the launch's processes (``WORLD_SIZE``)."""
    from ds_hydra.training.memory_estimate import Sharding

    world = launch_env.world_size()
    name = getattr(engine.name, "value", engine.name)
    if name == "fsdp":
        return Sharding(world, parameters=True, gradients=True, optimizer_state=True, optimizer_on_host=bool(engine.cpu_offload))
    if name == "deepspeed":
        stage = int(engine.zero_stage)
        offload = getattr(engine.offload_optimizer, "value", engine.offload_optimizer) != "none"
        return Sharding(world, parameters=stage >= 3, gradients=stage >= 2, optimizer_state=stage >= 1, optimizer_on_host=offload)
    return Sharding(world)  # one process, DDP (gradients as bucket views: no second copy)


def judge_step_memory(cfg) -> MemoryVerdict:
    """The estimate of ``cfg``'s step against its device's free memory, and the line that says so."""
    from ds_hydra.activation_checkpointing.config import format_bytes
    from ds_hydra.training.memory_estimate import estimate_step_memory, free_memory

    spec = step_spec(cfg)
    on_host = spec.device.type == "cpu"
    free, source = free_memory(spec.device, launch_env.local_world_size() if on_host else 1)

    def alternatives(estimate) -> dict:  # replayed in the same estimate, only for a step that may not fit
        if free is None or estimate.total <= WARN_ABOVE * free:
            return {}
        return {name: step_spec(changed) for name, changed in _alternative_configs(cfg)}

    estimate = estimate_step_memory(spec, alternatives)
    device = str(spec.device)
    needs = f"memory: one training step needs about {estimate.describe()} on {device}"
    limit = cfg.trainer.get("memory_limit", None)
    if limit is not None:  # the user's own limit is hard: over it is refused, under it accepted
        from ds_hydra.training.config import parse_memory_limit

        allowed = parse_memory_limit(limit)
        versus = f"trainer.memory_limit={limit} ({format_bytes(allowed)}, {estimate.total / max(allowed, 1):.0%})"
        if estimate.total <= allowed:
            return MemoryVerdict(estimate, allowed, "trainer.memory_limit", device, logging.INFO, f"{needs}, within {versus}")
        advice = f"{estimate.dominant()} dominate: {estimate.advice()}"
        return MemoryVerdict(estimate, allowed, "trainer.memory_limit", device, logging.ERROR, f"{needs}, over {versus}; {advice}")
    if free is None:
        return MemoryVerdict(estimate, None, source, device, logging.INFO, f"{needs}; free memory {source}")
    ratio = estimate.total / max(free, 1)
    versus = f"{format_bytes(free)} {source} ({ratio:.0%})"
    if ratio <= WARN_ABOVE:
        return MemoryVerdict(estimate, free, source, device, logging.INFO, f"{needs}, of {versus}")
    advice = "; ".join([f"{estimate.dominant()} dominate: {estimate.advice()}", *_alternatives(estimate, free)])
    if ratio > REFUSE_ABOVE:
        return MemoryVerdict(estimate, free, source, device, logging.ERROR, f"{needs}, far over the {versus}; {advice}")
    return MemoryVerdict(estimate, free, source, device, logging.WARNING, f"{needs}, close to the {versus}: it may not fit; {advice}")


# What a refusal offers to try, as overrides: every block recomputed on its own; the head in chunks.
PER_BLOCK = {"ckpt.full": True, "ckpt.segments": 0, "ckpt.number_checkpoints": None, "ckpt.every_n": 0,
             "ckpt.memory_budget": None, "ckpt.selective": False}
MAX_HEAD_CHUNKS = 16  # a chunk is a checkpointed call: thousands of them would make the estimate slow


def _head_chunks(cfg) -> dict:
    """``model.head_chunk_tokens``: 1024 tokens, or more so that a batch has at most MAX_HEAD_CHUNKS chunks."""
    from ds_hydra.training.slices import vocab_size_of

    tokens = int(cfg.trainer.batch_size) * seq_len_of(cfg, vocab_size_of(cfg)[0])
    per_chunk = -(-tokens // MAX_HEAD_CHUNKS)
    return {"model.head_chunk_tokens": max(1024, -(-per_chunk // 1024) * 1024)}


def _alternative_configs(cfg) -> List[Tuple[str, Any]]:
    """(override, changed config) for what a refusal offers: every block recomputed; the head in chunks."""
    from omegaconf import OmegaConf, open_dict

    found = []
    chunked = _head_chunks(cfg) if "head_chunk_tokens" in cfg.model and not cfg.model.head_chunk_tokens else None
    for name, changes in (("ckpt=full", PER_BLOCK), (f"model.head_chunk_tokens={chunked and chunked['model.head_chunk_tokens']}", chunked)):
        if not changes:
            continue
        changed = cfg.copy()
        with open_dict(changed):
            for key, value in changes.items():
                OmegaConf.update(changed, key, value)
        found.append((name, changed))
    return found


def _alternatives(estimate, free: int) -> List[str]:
    """``ckpt=full needs 13.9 GiB (fits)``-style lines for the alternatives that save at least a tenth."""
    from ds_hydra.activation_checkpointing.config import format_bytes

    return [f"{name} needs {format_bytes(needs)}{' (fits)' if needs <= WARN_ABOVE * free else ''}"
            for name, needs in estimate.alternatives.items() if needs < 0.9 * estimate.total]


def check_step_memory(cfg, say=None) -> Optional[MemoryVerdict]:
    """Refuse (``UserError``) a step far over the free memory (or over ``trainer.memory_limit``);
    ``say(level, line)`` the verdict otherwise (default: log it). ``trainer.batch_size=auto`` and
    ``ckpt=auto`` must be resolved first (``memory_fit.fit_to_memory``, which the callers run).
    Ranks other than 0 leave the check to rank 0."""
    mode = getattr(cfg.run.memory_check, "value", cfg.run.memory_check) if "run" in cfg else "refuse"
    if mode == "off" or launch_env.other_rank():
        return None
    say = say or log.log
    try:
        verdict = judge_step_memory(cfg)
    except UserError:
        raise
    except Exception as exc:  # a model the estimate cannot run on fake tensors: train without it
        say(logging.WARNING, f"memory: could not estimate one training step ({_one_line(exc)}); run.memory_check=off skips this")
        return None
    if verdict.level >= logging.ERROR:
        if mode == "refuse":
            raise UserError(f"{verdict.line}; or run.memory_check=warn to try anyway")
        verdict.level = logging.WARNING
    say(verdict.level, verdict.line)
    return verdict


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:300]
