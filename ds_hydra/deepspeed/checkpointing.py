"""DeepSpeed's activation-checkpointing module (``deepspeed.checkpointing``) on plain torch.

Model code written against DeepSpeed, Megatron-style::

    import deepspeed
    deepspeed.checkpointing.configure(mpu, deepspeed_config="ds_config.json")
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(1234)
    hidden = deepspeed.checkpointing.checkpoint(layer, hidden, mask)
    with deepspeed.checkpointing.get_cuda_rng_tracker().fork():
        probs = attention_dropout(probs)

runs unchanged with ``import ds_hydra.checkpointing as checkpointing`` in place of the DeepSpeed
import, on a GPU or a CPU, with DeepSpeed's function names and arguments: ``configure``, ``checkpoint``
(``function(*args, **kwargs)`` is recomputed in backward instead of keeping its activations),
``non_reentrant_checkpoint``, ``is_configured``, ``reset``, ``get_cuda_rng_tracker``,
``model_parallel_cuda_manual_seed``, ``model_parallel_reconfigure_tp_seed``, ``set_num_layers``,
``partition_activations_in_checkpoint``, ``CudaRNGStatesTracker``. (This is activation checkpointing;
saving and resuming training is ``ds_hydra.training.state``.)

What each setting does here:

* RNG replay: a recompute starts from the CPU and device generator states of its forward, and from the
  RNG tracker's named states, so dropout masks repeat and gradients are bit-identical to running the
  function without checkpointing;
* ``checkpoint_in_cpu`` (``cpu_checkpointing``): the inputs kept for the recompute live in pinned host
  memory while CUDA tensors wait for backward (on a CPU they are in host memory already);
* ``synchronize`` (``synchronize_checkpoint_boundary``): a CUDA synchronize before and after each
  checkpointed call, in forward and in recompute (nothing to synchronize on a CPU);
* ``profile``: one log line per backward pass with the number of checkpointed calls and their
  forward and recompute times;
* ``partition_activations``, ``contiguous_checkpointing`` (``contiguous_memory_optimization``),
  ``num_checkpoints`` (``number_checkpoints``): DeepSpeed partitions checkpoint inputs across
  tensor-parallel ranks and packs the partitions into ``num_checkpoints`` preallocated buffers;
  ds_hydra has no tensor parallelism, where DeepSpeed keeps every input whole too: accepted, logged,
  no effect.

Differences from DeepSpeed, deliberate: ``checkpoint`` is torch's non-reentrant checkpoint (DeepSpeed's
is reentrant, which computes no parameter gradients when no input requires grad; ``ckpt.use_reentrant``
selects torch's reentrant one); ``reset()`` has no buffers to free; ``configure`` starts from the run's
``ckpt`` settings instead of all-off defaults, so a model's own ``configure(mpu)`` keeps them; calls
inside a block that ds_hydra's own policy (``ckpt.segments``, ``ckpt.full``, ...) checkpoints run the
function directly, since the block is recomputed as a whole.

When ds_hydra trains a model (``prepare_model``), it configures this module from the run's ``ckpt``
config (``configure_for_run``): ``is_configured()`` is then True.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ds_hydra.activation_checkpointing.apply import inside_checkpointed_region
from ds_hydra.activation_checkpointing.counter import note_kept
from ds_hydra.activation_checkpointing.offload import HostOffload
from ds_hydra.activation_checkpointing.rng import (
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    CudaRNGStatesTracker,
    get_cuda_rng_tracker,
    manual_seed,
    replaying_tracker,
)
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "CudaRNGStatesTracker",
    "checkpoint",
    "configure",
    "configure_for_run",
    "current_settings",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "model_parallel_reconfigure_tp_seed",
    "non_reentrant_checkpoint",
    "partition_activations_in_checkpoint",
    "reset",
    "set_num_layers",
]

_MODEL_PARALLEL_RNG_TRACKER_NAME = MODEL_PARALLEL_RNG_TRACKER_NAME  # DeepSpeed's name for it
MODEL_PARALLEL_SEED_OFFSET = 2718
"""Tensor-parallel rank r draws from seed + 2718 + r (DeepSpeed's and Megatron's offset)."""

# activation_checkpointing keys of a DeepSpeed config -> configure() arguments
DEEPSPEED_KEYS = {
    "partition_activations": "partition_activations",
    "contiguous_memory_optimization": "contiguous_checkpointing",
    "number_checkpoints": "num_checkpoints",
    "cpu_checkpointing": "checkpoint_in_cpu",
    "synchronize_checkpoint_boundary": "synchronize",
    "profile": "profile",
}


@dataclass(frozen=True)
class Settings:
    """What ``checkpoint`` does; ``configure``'s arguments plus two of ds_hydra's ``ckpt`` keys."""

    partition_activations: bool = False
    """DeepSpeed: split checkpoint inputs across tensor-parallel ranks (none here: no effect)."""
    contiguous_checkpointing: bool = False
    """DeepSpeed: pack partitioned inputs into preallocated buffers (nothing partitioned here: no effect)."""
    num_checkpoints: Optional[int] = None
    """DeepSpeed: how many buffers ``contiguous_checkpointing`` preallocates (recorded only)."""
    checkpoint_in_cpu: bool = False
    """Keep the inputs saved for the recompute in pinned host memory (CUDA tensors)."""
    synchronize: bool = False
    """CUDA synchronize before and after each checkpointed call, in forward and in recompute."""
    profile: bool = False
    """Log forward and recompute times of the checkpointed calls once per backward pass."""
    use_reentrant: bool = False
    """ckpt.use_reentrant: torch's reentrant checkpoint for ``checkpoint`` (not ``non_reentrant_checkpoint``)."""
    preserve_rng_state: bool = True
    """ckpt.preserve_rng_state: replay the generators on recompute (dropout masks repeat)."""


class _Profile:
    """Forward and recompute times of the checkpointed calls of one forward/backward pass."""

    def __init__(self) -> None:
        self.forward: List[float] = []
        self.recompute: Dict[int, float] = {}

    def next_index(self) -> int:
        return len(self.forward)

    def add_forward(self, seconds: float) -> None:
        self.forward.append(seconds)

    def add_recompute(self, index: int, seconds: float) -> None:
        self.recompute[index] = seconds
        if index == 0:  # backward recomputes the first call last: the pass is complete
            n = len(self.forward)
            log.info(
                "checkpointing.profile: %d checkpointed calls: forward %.2f ms (slowest %.2f ms), recompute %.2f ms "
                "(slowest %.2f ms)", n, 1e3 * sum(self.forward), 1e3 * max(self.forward, default=0.0),
                1e3 * sum(self.recompute.values()), 1e3 * max(self.recompute.values(), default=0.0),
            )
            self.forward, self.recompute = [], {}


@dataclass
class _State:
    settings: Settings = dataclasses.field(default_factory=Settings)
    run_settings: Optional[Settings] = None  # the run's ckpt config, the base of every configure()
    configured: bool = False
    mpu: Any = None
    profile: _Profile = dataclasses.field(default_factory=_Profile)
    noted_cpu_offload: bool = False


_STATE = _State()


# -- configuration --------------------------------------------------------------------------------
def configure(
    mpu_,
    deepspeed_config=None,
    partition_activations: Optional[bool] = None,
    contiguous_checkpointing: Optional[bool] = None,
    num_checkpoints: Optional[int] = None,
    checkpoint_in_cpu: Optional[bool] = None,
    synchronize: Optional[bool] = None,
    profile: Optional[bool] = None,
) -> None:
    """DeepSpeed's ``configure``: the run's settings (or all off outside a run), then the
    ``activation_checkpointing`` section of ``deepspeed_config`` (a JSON file's path or a dict), then
    every argument that is not None. ``mpu_``: Megatron's model-parallel unit, or None."""
    if mpu_ is not None:
        _STATE.mpu = mpu_
    settings = _STATE.run_settings or Settings()
    if deepspeed_config is not None:
        settings = dataclasses.replace(settings, **_settings_from_deepspeed_config(deepspeed_config))
    given = {
        "partition_activations": partition_activations, "contiguous_checkpointing": contiguous_checkpointing,
        "num_checkpoints": num_checkpoints, "checkpoint_in_cpu": checkpoint_in_cpu, "synchronize": synchronize,
        "profile": profile,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    _set(settings)
    for note in _notes(settings):
        log.info(note)
    log.info("checkpointing: configured: %s", _describe(settings))


def configure_for_run(ckpt) -> None:
    """The trainer's call: the run's ``ckpt`` config (a mapping with the ``ckpt`` group's keys) becomes
    what ``checkpoint`` does and the base of any later ``configure``; None forgets it and any mpu
    (unconfigured, as after import)."""
    if ckpt is None:
        _STATE.__init__()
        return
    settings = Settings(
        partition_activations=bool(ckpt.get("partition_activations", False)),
        contiguous_checkpointing=bool(ckpt.get("contiguous_memory_optimization", False)),
        num_checkpoints=ckpt.get("number_checkpoints"),
        checkpoint_in_cpu=bool(ckpt.get("cpu_checkpointing", False) or ckpt.get("offload", False)),
        synchronize=bool(ckpt.get("synchronize_checkpoint_boundary", False)),
        profile=bool(ckpt.get("profile", False)),
        use_reentrant=bool(ckpt.get("use_reentrant", False)),
        preserve_rng_state=bool(ckpt.get("preserve_rng_state", True)),
    )
    _STATE.run_settings = settings
    _set(settings)  # checkpoint_activations has logged what the keys do in this run


def _set(settings: Settings) -> None:
    _STATE.settings = settings
    _STATE.configured = True
    _STATE.profile = _Profile()


def is_configured() -> bool:
    """True once ``configure`` (or the trainer, for a run) has configured the module."""
    return _STATE.configured


def current_settings() -> Settings:
    """What ``checkpoint`` does now."""
    return _STATE.settings


def reset() -> None:
    """DeepSpeed frees its contiguous checkpoint buffers here (call it after forwards without backward,
    e.g. evaluation); ds_hydra has none, and drops only the unfinished profile records."""
    _STATE.profile = _Profile()


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """DeepSpeed's setter of ``partition_activations`` (no effect without tensor parallelism)."""
    _STATE.settings = dataclasses.replace(_STATE.settings, partition_activations=bool(partition_activation))


def set_num_layers(nlayers: Optional[int]) -> None:
    """DeepSpeed's setter of ``num_checkpoints`` (recorded only)."""
    _STATE.settings = dataclasses.replace(_STATE.settings, num_checkpoints=nlayers)


def _settings_from_deepspeed_config(config) -> Dict[str, Any]:
    """configure() arguments from the activation_checkpointing section of a DeepSpeed config."""
    if isinstance(config, (str, os.PathLike)):
        from ds_hydra.deepspeed.json_import import read_deepspeed_json

        config = read_deepspeed_json(config)
    if not isinstance(config, dict):
        raise UserError(f"checkpointing.configure: deepspeed_config must be a JSON file's path or a dict, got {type(config).__name__}")
    section = config.get("activation_checkpointing") or {}
    unknown = sorted(set(section) - set(DEEPSPEED_KEYS))
    if unknown:  # DeepSpeed ignores them as well
        log.warning("checkpointing: deepspeed_config: activation_checkpointing: ignored unknown key(s) %s (DeepSpeed "
                    "ignores them too); known keys: %s", ", ".join(unknown), ", ".join(DEEPSPEED_KEYS))
    return {DEEPSPEED_KEYS[key]: value for key, value in section.items() if value is not None and value != "auto"}


def _notes(settings: Settings) -> List[str]:
    notes = []
    tp = _tensor_parallel(_STATE.mpu, "world_size")
    if settings.partition_activations:
        notes.append(
            f"checkpointing: partition_activations=True: the inputs of each checkpoint stay whole (tensor-parallel "
            f"size {tp}; " + ("as DeepSpeed does with one rank)" if tp == 1 else
                              "ds_hydra has no activation partitioning: correct results, more memory than DeepSpeed)")
        )
    if settings.contiguous_checkpointing:
        notes.append("checkpointing: contiguous_checkpointing=True: nothing is partitioned, so there is nothing to "
                     "pack into buffers: no effect")
    return notes


def _describe(settings: Settings) -> str:
    return ", ".join(f"{f.name}={getattr(settings, f.name)}" for f in dataclasses.fields(settings))


# -- checkpoint -----------------------------------------------------------------------------------
def checkpoint(function: Callable, *args, **kwargs):
    """Run ``function(*args, **kwargs)`` keeping only its inputs; recompute it in backward. Tensors
    passed by keyword take part in autograd like positional ones. Returns what ``function`` returns (a
    one-item tuple or list comes back as its item, as from DeepSpeed)."""
    return _checkpoint(function, args, kwargs, reentrant=_STATE.settings.use_reentrant)


def non_reentrant_checkpoint(function: Callable, *args, **kwargs):
    """``checkpoint`` with torch's non-reentrant checkpoint, whatever ``ckpt.use_reentrant`` says."""
    return _checkpoint(function, args, kwargs, reentrant=False)


def _checkpoint(function: Callable, args, kwargs, reentrant: bool):
    if not torch.is_grad_enabled() or inside_checkpointed_region():
        return _one_item(function(*args, **kwargs))
    settings = _STATE.settings
    run, inputs = _positional(function, args, kwargs)
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_leaves(inputs))
    index = _STATE.profile.next_index()
    if settings.profile or (settings.synchronize and on_cuda):
        run = _timing_recompute(run, index, settings.profile, settings.synchronize and on_cuda)
    run = replaying_tracker(run)
    sync = settings.synchronize and on_cuda
    if sync:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with _offload(settings, on_cuda, inputs):
        output = torch_checkpoint(run, *inputs, use_reentrant=reentrant, preserve_rng_state=settings.preserve_rng_state)
    if sync:
        torch.cuda.synchronize()
    if settings.profile:
        _STATE.profile.add_forward(time.perf_counter() - started)
    note_kept(inputs)  # the recompute keeps them (counted for SavedActivationCounter)
    return _one_item(output)


def _positional(function: Callable, args, kwargs):
    """(function of positional arguments only, all arguments): keyword tensors take part in autograd
    (the reentrant checkpoint passes gradients only to positional inputs)."""
    if not kwargs:
        return function, tuple(args)
    keys, n = tuple(kwargs), len(args)

    def with_kwargs(*all_args):
        return function(*all_args[:n], **dict(zip(keys, all_args[n:])))

    return with_kwargs, tuple(args) + tuple(kwargs.values())


def _timing_recompute(run: Callable, index: int, profile: bool, sync: bool) -> Callable:
    calls = 0

    def timed(*args):
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward: timed around the checkpoint call
            return run(*args)
        if sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return run(*args)
        finally:
            if sync:
                torch.cuda.synchronize()
            if profile:
                _STATE.profile.add_recompute(index, time.perf_counter() - started)

    return timed


def _offload(settings: Settings, on_cuda: bool, inputs):
    """``checkpoint_in_cpu``: the checkpoint's saved inputs go to pinned host memory (CUDA tensors)."""
    if not settings.checkpoint_in_cpu:
        return contextlib.nullcontext()
    if not on_cuda:
        if not _STATE.noted_cpu_offload:
            log.info("checkpointing: checkpoint_in_cpu=True: the inputs are in host memory already (CPU tensors)")
            _STATE.noted_cpu_offload = True
        return contextlib.nullcontext()
    return HostOffload("cuda", keep=set())


def _one_item(output):
    if isinstance(output, (tuple, list)) and len(output) == 1:
        return output[0]
    return output


# -- model-parallel seeds -------------------------------------------------------------------------
def _tensor_parallel(mpu, what: str) -> int:
    """Megatron's mpu's tensor-parallel ``rank`` or ``world_size`` (new or old method names); 0 / 1 without one."""
    if mpu is None:
        return 0 if what == "rank" else 1
    method = getattr(mpu, f"get_tensor_model_parallel_{what}", None) or getattr(mpu, f"get_model_parallel_{what}")
    return int(method())


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` (the same on every tensor-parallel rank) and the tracker's
    ``model-parallel-rng`` state with ``seed + 2718 + tensor-parallel rank`` (different on each);
    DeepSpeed's and Megatron's function. Call it after ``configure(mpu)`` when there is an mpu."""
    tp_rank = _tensor_parallel(_STATE.mpu, "rank")
    model_parallel_seed = seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    manual_seed(seed)
    tracker.add(MODEL_PARALLEL_RNG_TRACKER_NAME, model_parallel_seed)
    log.info("checkpointing: seeds: data-parallel %d, model-parallel %d (tensor-parallel rank %d)",
             seed, model_parallel_seed, tp_rank)


def model_parallel_reconfigure_tp_seed(seed: int) -> None:
    """Re-seed the tracker's model-parallel state (``seed + 2718 + rank``) without touching the default one."""
    with get_cuda_rng_tracker().fork():
        manual_seed(seed + MODEL_PARALLEL_SEED_OFFSET + _tensor_parallel(_STATE.mpu, "rank"))


# -- DeepSpeed's module globals, read-only ----------------------------------------------------------
_GLOBALS = {
    "PARTITION_ACTIVATIONS": lambda: _STATE.settings.partition_activations,
    "CONTIGUOUS_CHECKPOINTING": lambda: _STATE.settings.contiguous_checkpointing,
    "CPU_CHECKPOINT": lambda: _STATE.settings.checkpoint_in_cpu,
    "SYNCHRONIZE": lambda: _STATE.settings.synchronize,
    "PROFILE_TIME": lambda: _STATE.settings.profile,
    "num_layers": lambda: _STATE.settings.num_checkpoints,
    "mpu": lambda: _STATE.mpu,
    "deepspeed_checkpointing_enabled": lambda: _STATE.configured,
}


def __getattr__(name):
    if name in _GLOBALS:
        return _GLOBALS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
