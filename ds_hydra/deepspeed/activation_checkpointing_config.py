"""DeepSpeed's ``activation_checkpointing`` keys in the ``ckpt`` group, and what each means in ds_hydra (torch-free).

The keys are fields of the ``ckpt`` schema (``CkptConfig`` takes them from ``DeepSpeedCheckpointingKeys``),
so that section of a DeepSpeed JSON config can be passed as it is (``ckpt=deepspeed``,
``ckpt.number_checkpoints=4``). Their meaning is DeepSpeed's without tensor parallelism:

* ``number_checkpoints`` is ds_hydra's ``segments`` and ``cpu_checkpointing`` its ``offload``
  (``translate``: read by the ``ckpt`` mapping, and by the JSON export to write them back);
* ``synchronize_checkpoint_boundary`` and ``profile`` are run options of every checkpointed region;
* ``partition_activations`` and ``contiguous_memory_optimization`` act only across tensor-parallel
  ranks: accepted, logged (``notes``), no effect.

The same keys configure ``ds_hydra.checkpointing`` (DeepSpeed's module surface) for models that call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass
class DeepSpeedCheckpointingKeys:
    """DeepSpeed's ``activation_checkpointing`` keys (the last fields of the ``ckpt`` schema)."""

    number_checkpoints: Optional[int] = None
    """DeepSpeed's name for ``segments``."""
    cpu_checkpointing: bool = False
    """DeepSpeed's name for ``offload``."""
    synchronize_checkpoint_boundary: bool = False
    """DeepSpeed: synchronize the CUDA device before and after each checkpointed segment, in forward and in
    recompute (no-op on CPU); also for the model's own ``ds_hydra.checkpointing.checkpoint`` calls."""
    profile: bool = False
    """DeepSpeed: log every step's forward and recompute time of each checkpointed segment (and of the
    model's own ``ds_hydra.checkpointing.checkpoint`` calls)."""
    partition_activations: bool = False
    """DeepSpeed: split checkpointed activations across tensor-parallel ranks. Without tensor parallelism
    DeepSpeed keeps each input whole, and so does ds_hydra: accepted, logged, no effect."""
    contiguous_memory_optimization: bool = False
    """DeepSpeed: copy partitioned activations into one preallocated buffer; nothing is partitioned without
    tensor parallelism: accepted, logged, no effect."""


@dataclass(frozen=True)
class Translated:
    """What DeepSpeed's keys of one ``ckpt`` config ask of ds_hydra's policies."""

    segments: int
    """The segment count: ``segments``, or ``number_checkpoints`` when that is the one given (0: none)."""
    segments_key: str
    """The key the count came from, for messages."""
    offload: bool
    """``offload`` or ``cpu_checkpointing``."""
    problems: Tuple[str, ...]


def translate(cfg, prefix: str = "ckpt") -> Translated:
    """ds_hydra's meaning of DeepSpeed's alias keys in ``cfg`` (a ``ckpt`` config: dataclass or DictConfig).

    The two names of the segment count must agree when both are set; everything else is plain."""
    segments, alias = _key(cfg, "segments", 0) or 0, _key(cfg, "number_checkpoints", None)
    problems = []
    if segments and alias and segments != alias:
        problems.append(
            f"{prefix}.number_checkpoints={alias}: is DeepSpeed's name for {prefix}.segments, "
            f"which is {segments}; set one of them"
        )
    if alias not in (None, 0) and not segments:
        count, key = int(alias), "number_checkpoints"
    else:
        count, key = int(segments), "segments"
    offload = bool(_key(cfg, "offload", False) or _key(cfg, "cpu_checkpointing", False))
    return Translated(count, key, offload, tuple(problems))


def _key(cfg, name: str, default):
    """``cfg.name``; ``default`` where a partial config (a DeepSpeed export's input) lacks the key."""
    return getattr(cfg, name, default)


def notes(cfg, recomputes_blocks: bool, prefix: str = "ckpt") -> List[str]:
    """One line for each DeepSpeed key that is set and does nothing in this run, saying why (logged, not
    refused: DeepSpeed accepts them too and, without tensor parallelism, does nothing with them either).
    ``recomputes_blocks``: whether a policy of ds_hydra's chooses blocks to recompute."""
    found = []
    if cfg.partition_activations:
        found.append(
            f"{prefix}.partition_activations=true: DeepSpeed splits each checkpoint's inputs across the tensor-parallel "
            f"ranks; with none (a tensor-parallel size of 1, as here) every rank keeps its whole input, as in DeepSpeed: "
            f"no effect ({prefix}.cpu_checkpointing=true moves them to host memory instead)"
        )
    if cfg.contiguous_memory_optimization:
        found.append(
            f"{prefix}.contiguous_memory_optimization=true: DeepSpeed copies partitioned checkpoint inputs into one "
            f"preallocated buffer; without tensor parallelism nothing is partitioned: no effect"
        )
    for key in ("profile", "synchronize_checkpoint_boundary"):
        if getattr(cfg, key) and not recomputes_blocks:
            found.append(
                f"{prefix}.{key}=true: no block policy is set, so it applies to the model's own "
                f"ds_hydra.checkpointing.checkpoint calls only (add {prefix}.segments=K, {prefix}.full=true, ... for ds_hydra's)"
            )
    return found

