"""data=tokens (prepared and nanoGPT directories), data=text, and the window samplers."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_hydra.data.corpus import CharCorpus, embedded_corpus_text
from ds_hydra.data.batches import RandomBlocks
from ds_hydra.data.samplers import EpochOrder, Permutation, SequentialWindows
from ds_hydra.data.text import TextData
from ds_hydra.data.tokens import TokenFiles
from ds_hydra.data.token_stream import ArrayTokens, FileTokens
from ds_hydra.errors import UserError

CPU = torch.device("cpu")


def nanogpt_char_dir(folder: Path) -> Path:
    """What nanoGPT's data/shakespeare_char/prepare.py writes."""
    data = embedded_corpus_text()
    chars = sorted(set(data))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    folder.mkdir(parents=True)
    np.array([stoi[c] for c in data[: int(n * 0.9)]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return folder


def test_a_nanogpt_char_directory_reads_as_is(tmp_path):
    data = TokenFiles(str(nanogpt_char_dir(tmp_path / "shakespeare_char")))
    corpus = CharCorpus()
    assert data.vocab_size == 65 and data.num_tokens("train") == len(corpus.train) and data.num_tokens("val") == len(corpus.val)
    assert np.array_equal(data.tokens("train"), corpus.train)
    assert data.decode(data.tokens("val")[:50]) == corpus.decode(corpus.val[:50]) == embedded_corpus_text()[len(corpus.train):][:50]


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_meta_pkl_is_read_without_running_code(tmp_path, monkeypatch):
    folder = nanogpt_char_dir(tmp_path / "d")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": _Payload()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"meta.pkl: not a plain nanoGPT meta.pkl \(refused to load posix.system"):
        TokenFiles(str(folder))
    assert not (tmp_path / "PWNED").exists()


def test_gpt2_directories_without_meta(tmp_path, caplog):
    folder = tmp_path / "owt"
    folder.mkdir()
    np.arange(1000, dtype=np.uint16).tofile(folder / "train.bin")
    np.array([5, 50_256, 7], dtype=np.uint16).tofile(folder / "val.bin")
    with caplog.at_level("INFO"):
        assert TokenFiles(str(folder)).vocab_size == 50_257
    assert "GPT-2's 50257-token vocabulary" in caplog.text
    assert TokenFiles(str(folder), vocab_size=50_304).vocab_size == 50_304  # nanoGPT's padded size
    np.array([5, 60_000], dtype=np.uint16).tofile(folder / "val.bin")
    with pytest.raises(UserError, match="the token files hold id 60000, beyond the vocabulary of 50257; set data.vocab_size=60001"):
        TokenFiles(str(folder))
    assert TokenFiles(str(folder), vocab_size=60_001).vocab_size == 60_001
    with pytest.raises(UserError, match=r"data.vocab_size=50: smaller than the data's vocabulary \(65\)"):
        TokenFiles(str(nanogpt_char_dir(tmp_path / "c")), vocab_size=50)


def test_broken_directories_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        TokenFiles(str(tmp_path / "absent"))
    folder = nanogpt_char_dir(tmp_path / "d")
    (folder / "val.bin").unlink()
    with pytest.raises(UserError, match="no val.bin"):
        TokenFiles(str(folder))
    (folder / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(UserError, match="3 bytes is not a whole number of uint16 tokens"):
        TokenFiles(str(folder))


def test_prepared_directory_checks_its_files_against_meta(tmp_path):
    pytest.importorskip("tokenizers")
    from ds_hydra.data.prepare import prepare_dataset
    from ds_hydra.data.prepare_inputs import resolve_inputs

    (tmp_path / "a.txt").write_text(embedded_corpus_text()[:20_000])
    prepare_dataset(resolve_inputs([str(tmp_path / "a.txt")]), tmp_path / "out", {"kind": "bytes", "eos_token": "<|endoftext|>"}, progress=False)
    data = TokenFiles(str(tmp_path / "out"))
    assert data.vocab_size == 257 and data.tokenizer.kind == "bytes" and data.num_tokens("train") == 18_000
    with open(tmp_path / "out" / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="train.bin: holds 500 tokens but meta.json says 18,000"):
        TokenFiles(str(tmp_path / "out"))


# -- samplers --------------------------------------------------------------------------------------


def test_random_windows_of_a_file_are_the_in_memory_batches(tmp_path):
    tokens = CharCorpus().train
    tokens.astype(np.uint16).tofile(tmp_path / "train.bin")
    sources = [ArrayTokens(tokens), FileTokens(tmp_path / "train.bin", np.uint16, len(tokens))]
    for rank in (0, 1):
        in_memory = RandomBlocks(torch.from_numpy(tokens), 64, 12, 1337, stream=0, rank=rank, world_size=2)
        samplers = [RandomBlocks(s, 64, 12, 1337, stream=0, rank=rank, world_size=2) for s in sources]
        for _ in range(3):
            expected = in_memory.next_batch(CPU)
            for sampler in samplers:
                batch = sampler.next_batch(CPU)
                assert batch["input_ids"].dtype == torch.int64
                assert all(torch.equal(batch[k], expected[k]) for k in ("input_ids", "labels"))


def collect(sampler, calls):
    return torch.cat([sampler.next_batch(CPU)["input_ids"] for _ in range(calls)])


@pytest.mark.parametrize("shuffle", [True, False])
def test_sequential_epochs_see_every_token_once(shuffle):
    T, B, n_windows = 8, 4, 24
    stream = ArrayTokens(np.arange(n_windows * T + 5))  # 4 tokens past the last whole window
    sampler = SequentialWindows(stream, T, B, seed=3, shuffle=shuffle)
    epoch = collect(sampler, n_windows // B)
    assert sorted(epoch[:, 0].tolist()) == list(range(0, n_windows * T, T))  # each window once
    assert torch.equal(epoch.sort(dim=0).values.flatten().sort().values, torch.arange(n_windows * T))  # each token once
    assert (epoch[:, 0].tolist() == list(range(0, n_windows * T, T))) == (not shuffle)
    batch = SequentialWindows(stream, T, B, seed=3).next_batch(CPU)
    assert torch.equal(batch["labels"], batch["input_ids"] + 1)  # labels are the next tokens
    following = collect(sampler, n_windows // B)
    assert sorted(following[:, 0].tolist()) == sorted(epoch[:, 0].tolist())
    assert (following[:, 0].tolist() != epoch[:, 0].tolist()) == shuffle  # each epoch has its own order


def test_sequential_ranks_are_disjoint_and_resume_exactly():
    stream = ArrayTokens(np.arange(10_000))
    single = collect(SequentialWindows(stream, 16, 3, seed=1), 8)
    ranks = [SequentialWindows(stream, 16, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    by_rank = [collect(r, 4) for r in ranks]
    # rank r's m-th batch is global batch r + 2m: together they are the single-process stream
    interleaved = torch.cat([by_rank[m % 2][(m // 2) * 3:(m // 2) * 3 + 3] for m in range(8)])
    assert torch.equal(interleaved, single)
    assert not set(by_rank[0][:, 0].tolist()) & set(by_rank[1][:, 0].tolist())
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"batches": 8}  # the same position on every rank
    resumed = SequentialWindows(stream, 16, 3, seed=1)  # on one process: it continues at global batch 8
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(collect(resumed, 2), collect(SequentialWindows(stream, 16, 3, seed=1), 10)[-6:])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4097])
def test_permutation_is_a_bijection(n):
    order = [Permutation(n, key=7)(i) for i in range(n)]
    assert sorted(order) == list(range(n))
    if n > 64:
        assert order != list(range(n)) and order != [Permutation(n, key=8)(i) for i in range(n)]


def test_epoch_order_needs_no_memory_of_the_corpus():
    n = 10**12  # a trillion windows: only the asked-for indices are computed
    order = EpochOrder(n, seed=5)
    visits = np.array([0, 1, n - 1, n, n + 1], dtype=np.int64)
    items = order(visits)
    assert ((0 <= items) & (items < n)).all() and len(set(items[:3].tolist())) == 3


# -- data=text -------------------------------------------------------------------------------------


def test_text_data_with_chars_is_nanogpts_shakespeare_char(tmp_path):
    data = TextData()
    nanogpt = TokenFiles(str(nanogpt_char_dir(tmp_path / "shakespeare_char")))
    assert data.vocab_size == 65 and data.source.startswith("embedded Tiny Shakespeare")
    assert np.array_equal(data.tokens("train"), nanogpt.tokens("train"))
    assert np.array_equal(data.tokens("val"), nanogpt.tokens("val"))


def test_text_data_bpe_is_cached_by_content(tmp_path, caplog):
    pytest.importorskip("tokenizers")
    (tmp_path / "notes.txt").write_text(embedded_corpus_text()[:100_000])
    cfg = {"kind": "bpe", "vocab_size": 300, "min_frequency": 2, "eos_token": "<|endoftext|>", "train_chars": None}
    first = TextData(str(tmp_path / "notes.txt"), tokenizer_cfg=cfg, cache_dir=str(tmp_path / "cache"))
    assert first.vocab_size == 300 and first.tokenizer.kind == "bpe"
    with caplog.at_level("INFO"):
        second = TextData(str(tmp_path / "notes.txt"), tokenizer_cfg=cfg, cache_dir=str(tmp_path / "cache"))
    assert "is up to date" in caplog.text and second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 1
    TextData(str(tmp_path / "notes.txt"), tokenizer_cfg={**cfg, "vocab_size": 280}, cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2  # other settings, another entry
    text = first.tokenizer.decode(np.concatenate([first.tokens(s) for s in ("train", "val")]))
    assert text == embedded_corpus_text()[:100_000] + "<|endoftext|>"
