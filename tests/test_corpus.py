"""The built-in corpora and the random-window batch sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_hydra.data.batches import RandomBlocks

CPU = torch.device("cpu")


def test_embedded_corpus_is_tiny_shakespeare():
    from ds_hydra.data.corpus import CharCorpus, embedded_corpus_text

    text = embedded_corpus_text()
    assert len(text) == 1_115_394
    corpus = CharCorpus()
    assert corpus.vocab_size == 65
    assert len(corpus.train) == int(len(text) * 0.9)  # nanoGPT's split
    assert corpus.decode(corpus.train[:14]) == text[:14] == "First Citizen:"


@pytest.mark.parametrize("as_numpy", [False, True], ids=["tensor", "numpy"])
def test_batches_are_deterministic_and_shifted(as_numpy):
    tokens = torch.arange(1000)
    stream = tokens.numpy().astype(np.uint16) if as_numpy else tokens  # a memory-mapped file reads like this
    a = RandomBlocks(stream, seq_len=8, batch_size=4, seed=1)
    b = RandomBlocks(tokens, seq_len=8, batch_size=4, seed=1)
    batch_a, batch_b = a.next_batch(CPU), b.next_batch(CPU)
    assert batch_a.keys() == {"input_ids", "labels"}
    assert batch_a["input_ids"].dtype == torch.long and batch_a["input_ids"].shape == (4, 8)
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    assert torch.equal(batch_a["labels"], batch_a["input_ids"] + 1)  # the label of a position is the next token
    state = a.state_dict()
    following = a.next_batch(CPU)["input_ids"]
    a.load_state_dict(state)
    assert torch.equal(a.next_batch(CPU)["input_ids"], following)
    other_rank = RandomBlocks(tokens, seq_len=8, batch_size=4, seed=1, rank=1)
    assert not torch.equal(other_rank.next_batch(CPU)["input_ids"], batch_a["input_ids"])
