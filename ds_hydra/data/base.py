"""What the trainer asks of a data set: token streams per split, their vocabulary, and batch samplers.

``build_data(data_cfg, tokenizer_cfg, model_pretrained)`` instantiates the ``data`` config into a
``TokenData`` (the caller cuts the slices from the run's config). The trainer reads
``vocab_size`` (ids are in ``[0, vocab_size)``), ``seq_len`` (None: the model's maximum positions),
and asks ``sampler(split, ...)`` for batches ``{"input_ids", "labels"}`` of shape (B, T) whose
``labels[:, t]`` is the target of position t (-100: no loss there). Text data also encode and
decode, for prompts and samples, through their ``tokenizer`` (``ds_hydra.data.tokenizer``), which a
run saves into its directory (``tokenizer/``) so that inference decodes exactly as training encoded.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from ds_hydra.data.batches import RandomBlocks
from ds_hydra.errors import UserError
from ds_hydra.models.contract import IGNORE_INDEX  # noqa: F401  (labels that carry no loss; data produce them)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Sampler streams: one random sequence per use of a split (training, and each split's loss estimate).
TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: one of {', '.join(SPLITS)}")
    return split


class TokenData:
    """A token stream per split (``train`` and ``val``: 1-D torch tensors or NumPy arrays of ids)."""

    source: str = "tokens"
    vocab_size: int
    train = None
    val = None
    tokenizer = None  # text data: what encodes and decodes (encode, decode, vocab_size, eos_id, save)
    # In-run validation over every item of the val split (True), or over trainer.eval_batches random batches.
    eval_whole_split = False

    def __init__(self, seq_len: Optional[int] = None):
        self.seq_len = seq_len

    def tokens(self, split: str):
        return getattr(self, check_split(split))

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0,
                world_size: int = 1) -> RandomBlocks:
        """Random windows of ``split`` (see ``RandomBlocks``), resumable through its ``state_dict``."""
        return RandomBlocks(self.tokens(split), seq_len, batch_size, seed, stream=stream, rank=rank, world_size=world_size)

    def whole_split(self, split: str, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """Every token of ``split`` once: consecutive non-overlapping windows of ``seq_len`` (each token
        predicted from those before it in its window), in batches (see ``WholeSplit``)."""
        from ds_hydra.data.samplers import WholeSplit

        return WholeSplit.of_windows(self.tokens(split), seq_len, batch_size, rank, world_size)

    def check(self, seq_len: int) -> None:
        """Refuse, before step 1, a split too short for one sequence of ``seq_len`` (one line)."""
        for split in SPLITS:
            n = self.num_tokens(split)
            if n <= seq_len:
                name = "validation" if split == "val" else split
                raise UserError(f"data.seq_len={seq_len}: the {name} split has only {n} tokens; use a shorter data.seq_len")

    def encode(self, text: str) -> List[int]:
        if self.tokenizer is None:
            raise NotImplementedError(f"{type(self).__name__} has no text encoding")
        return self.tokenizer.encode(text)

    def decode(self, tokens) -> str:
        if self.tokenizer is None:
            raise NotImplementedError(f"{type(self).__name__} has no text decoding")
        return self.tokenizer.decode(tokens)


# What build_data passes to a data class that takes it: the tokenizer group, the pretrained model dir.
RUNTIME_ARGUMENTS = ("tokenizer_cfg", "model_pretrained")


def build_data(data_cfg, tokenizer_cfg=None, model_pretrained: Optional[str] = None) -> TokenData:
    """The data of the ``data`` config ``data_cfg`` (through the ``_target_`` allowlist of the config it
    belongs to). Data that tokenize text get the ``tokenizer`` config ``tokenizer_cfg``; a tokenizer that
    is not the one of ``model_pretrained`` (``model.pretrained``) is refused. Built once per process
    (``ds_hydra.data.memo``): the memory preflight and ``task=validate`` need it too."""
    from ds_hydra.data.memo import cached, data_key

    return cached(data_key(data_cfg, tokenizer_cfg, model_pretrained), lambda: _build_data(data_cfg, tokenizer_cfg, model_pretrained))


def _build_data(data_cfg, tokenizer_cfg, model_pretrained: Optional[str]) -> TokenData:
    import inspect

    from omegaconf import OmegaConf

    from ds_hydra.errors import ConfigError
    from ds_hydra.instantiate import _full_key, allowed_prefixes, instantiate, locate_target, target_problems

    refused = target_problems(data_cfg, allowed_prefixes(data_cfg), path=_full_key(data_cfg))
    if refused:  # before anything is imported
        raise ConfigError(refused)
    takes = inspect.signature(locate_target(data_cfg._target_)).parameters
    runtime = {"tokenizer_cfg": OmegaConf.to_container(tokenizer_cfg, resolve=True) if tokenizer_cfg is not None else None,
               "model_pretrained": model_pretrained}
    data = instantiate(data_cfg, **{k: v for k, v in runtime.items() if k in takes})
    if tokenizer_cfg is not None and "tokenizer_cfg" not in takes and tokenizer_cfg.get("kind") != "char":
        log.warning("tokenizer=%s: not used by %s, which brings its own", tokenizer_cfg.kind, data_cfg._target_.rsplit(".", 1)[-1])
    if model_pretrained and data.tokenizer is not None:
        from ds_hydra.data.tokenizer import tokenizer_mismatch

        problem = tokenizer_mismatch(data.tokenizer, model_pretrained)
        if problem:
            raise UserError(f"data: {problem}")
    return data
