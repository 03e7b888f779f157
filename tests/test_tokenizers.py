"""Tokenizers: char (today's vocabulary), bytes, byte-level BPE, local Hugging Face files; save and load."""
from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from ds_hydra.data import tokenizer as tk
from ds_hydra.data.corpus import embedded_corpus_text
from ds_hydra.errors import UserError

pytest.importorskip("tokenizers")

TEXT = "Héllo wörld: naïve café, 東京 🙂\nSecond line\n\n  indented\r\nlast <|endoftext|> words"


def bpe_cfg(**over):
    return OmegaConf.create({"kind": "bpe", "vocab_size": 400, "min_frequency": 2, "eos_token": "<|endoftext|>", "train_chars": None, **over})


@pytest.fixture(scope="module")
def shakespeare():
    return embedded_corpus_text()


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return tk.train_bpe([shakespeare[:200_000], TEXT], bpe_cfg())


def test_char_tokenizer_is_todays_corpus_vocabulary(shakespeare):
    from ds_hydra.data.corpus import CharCorpus

    tok = tk.CharTokenizer.fit(shakespeare)
    corpus = CharCorpus()
    assert tok.vocab_size == corpus.vocab_size == 65 and tok.eos_id is None
    ids = tok.encode_array(shakespeare)
    assert np.array_equal(ids[: len(corpus.train)], corpus.train) and len(ids) == len(corpus.train) + len(corpus.val)
    assert tok.decode(ids[:200]) == shakespeare[:200]


def test_char_eos_comes_after_the_characters():
    tok = tk.CharTokenizer.fit("abca", eos_token="<|endoftext|>")
    assert tok.chars == ["a", "b", "c"] and tok.vocab_size == 4 and tok.eos_id == 3
    assert tok.encode("cab") == [2, 0, 1]
    assert tok.decode([0, 3, 1]) == "a<|endoftext|>b"
    with pytest.raises(UserError, match="not in the vocabulary: 'xz'"):
        tok.encode("azx")


def test_bytes_round_trip_and_partial_characters():
    tok = tk.BytesTokenizer("<|endoftext|>")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode(ids) == TEXT
    assert tok.decode([72, 256, 0xC3, 0xA9, 0xC3]) == "H<|endoftext|>é\ufffd"  # generation may stop inside a character
    assert tk.BytesTokenizer(None).vocab_size == 256


def test_bpe_round_trips_any_text_and_keeps_the_eos_string_as_text(bpe):
    assert bpe.vocab_size == 400 and bpe.eos_id == 0
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT  # byte-level: every string survives
    assert bpe.eos_id not in ids  # "<|endoftext|>" inside a document is text, not the separator
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges compress


def test_bpe_training_is_deterministic(shakespeare, bpe):
    again = tk.train_bpe([shakespeare[:200_000], TEXT], bpe_cfg())
    assert again.fingerprint() == bpe.fingerprint()
    assert again._file_text() == bpe._file_text()


def test_long_texts_encode_in_pieces_exactly_as_whole(shakespeare, bpe, monkeypatch):
    text = shakespeare[:50_000] + "\n\n  \r\nx" * 50 + shakespeare[50_000:60_000]
    whole = np.asarray(bpe.tokenizer.encode(text, add_special_tokens=False).ids)
    assert len(tk.split_at_lines(text, 997)) > 40
    assert "".join(tk.split_at_lines(text, 997)) == text
    monkeypatch.setattr(bpe, "_piece_size", lambda texts: 997)
    assert np.array_equal(bpe.encode_array(text), whole)


@pytest.mark.parametrize("kind", ["char", "bytes", "bpe"])
def test_save_and_load_give_the_same_tokenizer(tmp_path, kind, bpe):
    tok = {"char": tk.CharTokenizer.fit(TEXT, "<|endoftext|>"), "bytes": tk.BytesTokenizer("<|endoftext|>"), "bpe": bpe}[kind]
    tok.save(tmp_path)
    loaded = tk.load_tokenizer(tmp_path)
    assert loaded.kind == kind and loaded.fingerprint() == tok.fingerprint()
    assert (loaded.vocab_size, loaded.eos_id, loaded.eos_token) == (tok.vocab_size, tok.eos_id, tok.eos_token)
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_a_changed_tokenizer_file_is_refused(tmp_path):
    tk.CharTokenizer.fit("abc").save(tmp_path)
    (tmp_path / tk.TOKENIZER_FILE).write_text(json.dumps({"type": "ds_hydra.char", "chars": "abd", "eos_token": None}))
    with pytest.raises(UserError, match="changed since it was saved"):
        tk.load_tokenizer(tmp_path)


def test_hf_tokenizer_from_a_file_or_a_model_dir(tmp_path, bpe):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text(bpe.tokenizer.to_str())
    from_file = tk.load_hf_tokenizer(model_dir / "tokenizer.json")
    assert from_file.kind == "hf" and from_file.eos_token == "<|endoftext|>"  # a well-known eos found in the vocabulary
    assert from_file.fingerprint() == bpe.fingerprint() and from_file.encode(TEXT) == bpe.encode(TEXT)
    # a model directory's tokenizer_config.json names its eos
    first = bpe.tokenizer.id_to_token(300)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": first}}))
    assert tk.load_hf_tokenizer(model_dir).eos_id == 300
    with pytest.raises(UserError, match="tokenizer.eos_token='<nope>': not in the vocabulary"):
        tk.load_hf_tokenizer(model_dir, "<nope>")
    with pytest.raises(UserError, match="no such file or directory"):
        tk.load_hf_tokenizer(tmp_path / "absent")
    cfg = OmegaConf.create({"kind": "hf", "path": None, "eos_token": None})
    with pytest.raises(UserError, match="tokenizer.path is not set"):
        tk.build_tokenizer(cfg)
    assert tk.build_tokenizer(cfg, model_pretrained=str(model_dir)).fingerprint() == bpe.fingerprint()


def test_mismatch_with_a_pretrained_models_tokenizer(tmp_path, bpe):
    (tmp_path / "tokenizer.json").write_text(bpe.tokenizer.to_str())
    assert tk.tokenizer_mismatch(bpe, str(tmp_path)) is None
    other = tk.train_bpe([TEXT * 20], bpe_cfg(vocab_size=300))
    assert "is not the tokenizer of model.pretrained" in tk.tokenizer_mismatch(other, str(tmp_path))
    assert "char tokenizer" in tk.tokenizer_mismatch(tk.CharTokenizer.fit(TEXT), str(tmp_path))
    assert tk.tokenizer_mismatch(other, str(tmp_path / "no_tokenizer_here")) is None


def test_tokenizer_config_problems():
    from ds_hydra.data.tokenizer_config import validate_tokenizer

    assert validate_tokenizer(bpe_cfg()) == []
    [problem] = validate_tokenizer(bpe_cfg(vocab_size=256))
    assert problem.startswith("tokenizer.vocab_size=256: too small for byte-level BPE; must be >= 257")


# -- the tokenizer of an exported model directory (task=export_hf) ------------------------------------
@pytest.mark.parametrize("kind", ["char", "char_eos", "bytes", "bpe"])
def test_every_kind_exports_as_a_transformers_tokenizer_with_the_same_ids(kind, bpe, shakespeare, tmp_path):
    """AutoTokenizer.from_pretrained on the written directory encodes to ds_hydra's ids (as the harness asks:
    without added special tokens), decodes them back to the text, knows the end-of-text id; and ds_hydra
    reading the directory back (model.pretrained=<export>) finds the same tokenizer."""
    transformers = pytest.importorskip("transformers", reason="task=export_hf needs the hf extra")
    from ds_hydra.data.tokenizer_export import save_for_transformers

    text = shakespeare[:3000] + ("\n" + TEXT if kind in ("bytes", "bpe") else "")
    ours = {
        "char": tk.CharTokenizer.fit(shakespeare),
        "char_eos": tk.CharTokenizer.fit(shakespeare, eos_token="<|endoftext|>"),
        "bytes": tk.BytesTokenizer(eos_token="<|endoftext|>"),
        "bpe": bpe,
    }[kind]
    text = text.replace("<|endoftext|>", "<|end of text|>")  # transformers reads that string as the token itself
    save_for_transformers(ours, tmp_path, model_max_length=128)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True, trust_remote_code=False)
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(text) and len(ids) > 100
    assert theirs.decode(ids) == text == ours.decode(ids)
    assert theirs.eos_token_id == ours.eos_id and theirs.model_max_length == 128
    assert len(theirs) == ours.vocab_size
    again = tk.load_hf_tokenizer(tmp_path)
    assert again.kind == ours.kind and again.fingerprint() == ours.fingerprint()
    if kind == "bytes":  # a byte sequence cut inside a character decodes as ds_hydra's does
        assert theirs.decode(ours.encode("é")[:1]) == ours.decode(ours.encode("é")[:1]) == "\ufffd"
