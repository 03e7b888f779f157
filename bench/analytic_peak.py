"""The analytic step-peak model of activation checkpointing, for bench/ckpt.py only.

The product predicts a step's peak in one way: ``ds_hydra.training.memory_estimate`` replays the whole
step on fake tensors. This walk is the closed-form model the checkpointing tables in the README are
read against: from the probe's per-block measurements (``ds_hydra.activation_checkpointing.measure.probe``)
it walks backward block by block (a region's recompute adds its activations, a block's backward frees
them and allocates its parameter gradients) and says where the allocator's peak should be, so the
bench can show how far the measured peak is from the formulas in ``policies``' docstring.
"""
from __future__ import annotations

from typing import Sequence


def transient_bytes(profile) -> int:
    """Backward's temporaries beyond the saved tensors while a block is differentiated: the gradient
    arriving at the block and the one it passes on, each the size of its input (an op's output
    gradient mostly replaces the saved tensor that op frees)."""
    return 2 * max(b.input_bytes for b in profile.blocks)


def walked_peak(profile, regions: Sequence) -> int:
    """Predicted allocator peak of forward + backward above the parameters (gradients included,
    allocated as backward reaches each block; the head's and embeddings' at its start)."""
    region_at_end = {r.end - 1: r for r in regions}
    mem = profile.kept_bytes(regions) + profile.outside_param_bytes
    transient = transient_bytes(profile)
    peak = mem + transient
    i = profile.n_blocks - 1
    while i >= 0:
        region = region_at_end.get(i)
        if region is None:  # a block whose activations were kept: backward, then free them
            block = profile.blocks[i]
            peak = max(peak, mem + block.param_bytes + transient)
            mem += block.param_bytes - block.inner_bytes - block.input_bytes * block.saves_input
            i -= 1
            continue
        span = profile.blocks[region.start:region.end]
        kept_sel = sum(b.selective_inner_bytes for b in span) if region.selective else 0
        held = span[0].input_bytes + kept_sel
        # the recompute re-creates what the blocks save, except the region's input and kept outputs
        recreated = sum(b.saved_bytes for b in span) - span[0].input_bytes * span[0].saves_input - kept_sel
        mem += recreated
        peak = max(peak, mem + max(b.param_bytes for b in span) + transient)
        mem += sum(b.param_bytes for b in span) - recreated - held
        i = region.start - 1
    return peak
