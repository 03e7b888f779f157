"""Schemas of the ``data`` config group (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from omegaconf import MISSING


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
    seq_len: Optional[int] = None
    """Tokens per training sequence; null: the model's maximum positions (model.block_size for the built-in GPT)."""


def validate_data(cfg, prefix: str = "data") -> List[str]:
    problems = []
    if "train_fraction" in cfg and not 0.0 < cfg.train_fraction < 1.0:
        problems.append(f"{prefix}.train_fraction={cfg.train_fraction}: must be in (0, 1)")
    if cfg.get("seq_len") is not None and cfg.seq_len < 1:
        problems.append(f"{prefix}.seq_len={cfg.seq_len}: must be >= 1, or null for the model's maximum positions")
    for key in ("vocab_size", "num_tokens"):
        if cfg.get(key) is not None and cfg[key] < 2:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 2")
    if "predictability" in cfg and not 0.0 <= cfg.predictability <= 1.0:
        problems.append(f"{prefix}.predictability={cfg.predictability}: must be in [0, 1]")
    if "train_roles" in cfg and not cfg.train_roles:
        problems.append(f"{prefix}.train_roles: empty; name the roles whose messages carry loss, e.g. [assistant]")
    if "role_template" in cfg:
        try:
            cfg.role_template.format(role="user")
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(f"{prefix}.role_template={cfg.role_template!r}: {{role}} is its only field ({type(exc).__name__}: {exc})")
    return problems


class Sampling(Enum):
    random = "random"  # windows at uniform random offsets, drawn afresh each batch (nanoGPT's get_batch)
    sequential = "sequential"  # epochs over non-overlapping windows: every token an input once per epoch


@dataclass
class TokensConfig:
    """Token files on disk (``task=prepare``'s output or nanoGPT's ``data/<name>/``), memory-mapped."""

    _target_: str = "ds_hydra.data.tokens.TokenFiles"
    dir: str = MISSING
    """The directory holding train.bin and val.bin (and meta.json or nanoGPT's meta.pkl)."""
    sampling: Sampling = Sampling.random
    """How training windows are drawn; sequential epochs record their position in checkpoints."""
    shuffle: bool = True
    """Sequential sampling: visit each epoch's windows in a seeded order (false: file order)."""
    seq_len: Optional[int] = None
    """Tokens per training sequence; null: the model's maximum (its block size)."""
    vocab_size: Optional[int] = None
    """Directories without meta.json/meta.pkl: the vocabulary size (null: GPT-2's 50257, as nanoGPT)."""
    tokenizer: Optional[str] = None
    """Directories without a saved tokenizer: a local tokenizer.json or model dir to decode samples with."""


@dataclass
class TextConfig:
    """One UTF-8 text file, tokenized at start with the ``tokenizer`` group (small corpora)."""

    _target_: str = "ds_hydra.data.text.TextData"
    path: Optional[str] = None
    """A UTF-8 text file; null: the embedded Tiny Shakespeare."""
    train_fraction: float = 0.9
    """The first fraction of the tokens trains, the rest validates (nanoGPT's 90/10 split)."""
    sampling: Sampling = Sampling.random
    """How training windows are drawn (see data=tokens)."""
    shuffle: bool = True
    """Sequential sampling: visit each epoch's windows in a seeded order."""
    seq_len: Optional[int] = None
    """Tokens per training sequence; null: the model's maximum (its block size)."""
    cache_dir: Optional[str] = None
    """Where BPE and hf tokenizations are cached by content hash; null: $DS_HYDRA_CACHE, else
    ~/.cache/ds_hydra (char and bytes tokenize in memory, nothing is written)."""


@dataclass
class SFTConfig:
    """Fine-tuning examples from JSONL: {"prompt", "response"} or chat {"messages": [{"role", "content"}]}."""

    _target_: str = "ds_hydra.data.sft.SFTData"
    path: Optional[str] = None
    """A JSONL file of examples; null: the small example set that ships with ds_hydra (sft_example.jsonl)."""
    val_path: Optional[str] = None
    """A JSONL file of validation examples; null: the last (1 - train_fraction) of path's examples."""
    train_fraction: float = 0.9
    """Without val_path: the first fraction of the examples trains, the rest validates."""
    seq_len: Optional[int] = None
    """Tokens per row; null: the model's maximum (its block size). Longer examples are cut (and counted)."""
    pack: bool = False
    """Pack several examples into each row (fewer pad tokens); false: one example per row, padded."""
    train_roles: List[str] = field(default_factory=lambda: ["assistant"])
    """Chat records: the roles whose messages carry loss (the others are context only)."""
    role_template: str = "<|{role}|>\n"
    """Chat records: the text that opens each message (context, no loss)."""
    message_end: str = "\n"
    """Chat records: the text after each message not trained on (trained messages end with the eos token)."""
