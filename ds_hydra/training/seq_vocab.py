"""Does the data fit the model? The sequence length a run trains on, and the vocabulary both must share.

Checked once the model is built (its maximum positions and vocabulary are its own to tell, see
``ds_hydra.models.contract``), by training and by everything that rebuilds a trained run.
"""
from __future__ import annotations

import torch.nn as nn

from ds_hydra.data.base import TokenData
from ds_hydra.errors import UserError
from ds_hydra.models.contract import max_positions, model_vocab_size


def resolve_seq_len(data: TokenData, model: nn.Module) -> int:
    """``data.seq_len``, or the model's maximum positions when it is null; checked against both (the data's
    own ``check``: every split yields something to train and evaluate on at that length)."""
    limit = max_positions(model)
    seq_len = data.seq_len or limit
    if seq_len is None:
        raise UserError(
            f"data.seq_len: {type(model).__name__} does not say how long a sequence it takes (no block_size, "
            f"max_seq_len or config.max_position_embeddings); set data.seq_len=<tokens per sequence>"
        )
    if limit is not None and seq_len > limit:
        raise UserError(f"data.seq_len={seq_len}: {type(model).__name__} takes at most {limit} positions; set data.seq_len <= {limit}")
    data.check(seq_len)  # before step 1: splits too short, SFT examples cut or with nothing to train on (one line each)
    return seq_len


def check_vocab(data: TokenData, model: nn.Module) -> None:
    vocab = model_vocab_size(model)
    if vocab is not None and vocab < data.vocab_size:
        raise UserError(
            f"model.vocab_size={vocab}: the data has {data.vocab_size} distinct tokens "
            "(set it at least that large, or null to take the data's)"
        )


def check_data_fits(cfg) -> None:
    """The data of ``cfg`` at its sequence length, checked from the config before anything else is built
    (the preflight): a split too short, SFT examples cut or with no trained token within it (one log line
    each), a split left with nothing to train or evaluate on (refused in one line)."""
    from ds_hydra.training.memory_preflight import seq_len_of
    from ds_hydra.training.slices import run_data, vocab_size_of

    vocab_size, _ = vocab_size_of(cfg)
    run_data(cfg).check(seq_len_of(cfg, vocab_size))  # built once per process: the trainer reuses it
