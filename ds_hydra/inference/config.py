"""Schema of the ``inference`` config group (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class InferenceConfig:
    checkpoint: Optional[str] = None
    """Run directory of a trained run to load (task=infer / task=eval)."""
    prompt: str = "\n"
    """Text the samples continue."""
    max_out_tokens: int = 256
    """New tokens per sample."""
    num_samples: int = 1
    """Samples to draw."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy."""
    top_k: Optional[int] = 200
    """Sample among the k most likely tokens (null: all)."""
    seed: int = 1337
    """Seed of the sampler."""
