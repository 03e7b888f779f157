"""Named RNG states for model-parallel code, and their replay when a checkpointed region recomputes.

Megatron-style models draw dropout masks inside tensor-parallel regions from a second, named RNG
state (``get_cuda_rng_tracker().fork()``), so that those masks differ between tensor-parallel ranks
while the default generator stays in step across them. ``CudaRNGStatesTracker`` is DeepSpeed's and
Megatron's tracker with the same methods (``add``, ``fork``, ``get_states``, ``set_states``, ``reset``).
The states belong to the accelerator's default generator: CUDA's current device when CUDA is
available, else the CPU generator (as DeepSpeed's CPU accelerator does), so the same model code runs
on a CPU.

torch's checkpoint replays the CPU and device generators on recompute, but knows nothing of the
tracker; ``replaying_tracker(fn)`` makes a recompute of ``fn`` start from the tracker states its
forward started from (and puts the current ones back afterwards), as DeepSpeed's checkpoint does.
Every activation-checkpointing path of ds_hydra wraps its function with it, so a ``fork()`` inside a
checkpointed block draws the same mask twice and gradients equal the un-checkpointed ones.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict

import torch

MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
"""The state Megatron-style tensor-parallel layers fork (DeepSpeed's ``_MODEL_PARALLEL_RNG_TRACKER_NAME``)."""


# -- the accelerator's default generator ----------------------------------------------------------
def _on_cuda() -> bool:
    return torch.cuda.is_available()


def get_rng_state() -> torch.Tensor:
    """The accelerator's generator state (CUDA's current device, else the CPU generator)."""
    return torch.cuda.get_rng_state() if _on_cuda() else torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    if _on_cuda():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def manual_seed(seed: int) -> None:
    """Seed the accelerator's generator (on a CPU-only machine: torch's CPU generator)."""
    if _on_cuda():
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


# -- the tracker ----------------------------------------------------------------------------------
class CudaRNGStatesTracker:
    """Named generator states: ``add(name, seed)`` creates one, ``fork(name)`` runs a block from it
    and keeps where it got to. Seeds and names are unique (a second ``add`` of either raises)."""

    def __init__(self) -> None:
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def reset(self) -> None:
        """Forget every state and seed."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of the name -> state map (the states are not modified in place, so it is a snapshot)."""
        return copy.copy(self.states_)

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new state ``name`` seeded with ``seed``; the current generator state is left as it was."""
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} already exists")
        self.seeds_.add(seed)
        current = get_rng_state()
        manual_seed(seed)
        self.states_[name] = get_rng_state()
        set_rng_state(current)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the block with the generator at state ``name``; afterwards ``name`` keeps where the block
        left it and the generator is back where it was."""
        if name not in self.states_:
            raise ValueError(
                f"RNG tracker: state {name!r} is not added; call model_parallel_cuda_manual_seed(seed) or "
                f"get_cuda_rng_tracker().add({name!r}, seed) first"
            )
        current = get_rng_state()
        set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = get_rng_state()
            set_rng_state(current)


_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    """The process's tracker (one, as in DeepSpeed and Megatron)."""
    return _TRACKER


# -- replay on recompute --------------------------------------------------------------------------
def replaying_tracker(fn: Callable) -> Callable:
    """``fn`` for a checkpoint: the first call (forward) runs as is; every later call (a recompute in
    backward) runs from the tracker states of the first, and leaves the tracker as it found it."""
    tracker = _TRACKER
    if not tracker.states_:
        return fn  # nothing tracked, nothing to replay
    at_forward = tracker.get_states()
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*args, **kwargs)
        now = tracker.get_states()
        tracker.set_states(copy.copy(at_forward))
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.set_states(now)

    return run
