"""Schemas of the ``data`` config group (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class CharCorpusConfig:
    """A character-level text corpus; by default Tiny Shakespeare, which ships inside the package."""

    _target_: str = "ds_hydra.data.corpus.CharCorpus"
    path: Optional[str] = None
    """A UTF-8 text file to train on instead; ``null`` uses the embedded Tiny Shakespeare."""
    train_fraction: float = 0.9
    """The first fraction of the text trains, the rest validates (nanoGPT's 90/10 split)."""


@dataclass
class SyntheticConfig:
    """Random tokens from a fixed low-entropy Markov chain: learnable, any vocabulary size."""

    _target_: str = "ds_hydra.data.corpus.SyntheticTokens"
    vocab_size: int = 256
    """Number of distinct tokens."""
    num_tokens: int = 200_000
    """Length of the generated stream (train + validation)."""
    train_fraction: float = 0.9
    """The first fraction of the stream trains, the rest validates."""
    predictability: float = 0.9
    """Probability that a token is the chain's fixed successor of the previous one (else uniform)."""
    seed: int = 0
    """Seed of the chain and the stream (independent of the trainer's seed)."""


def validate_data(cfg, prefix: str = "data") -> List[str]:
    problems = []
    if "train_fraction" in cfg and not 0.0 < cfg.train_fraction < 1.0:
        problems.append(f"{prefix}.train_fraction={cfg.train_fraction}: must be in (0, 1)")
    for key in ("vocab_size", "num_tokens"):
        if key in cfg and cfg[key] < 2:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 2")
    if "predictability" in cfg and not 0.0 <= cfg.predictability <= 1.0:
        problems.append(f"{prefix}.predictability={cfg.predictability}: must be in [0, 1]")
    return problems
