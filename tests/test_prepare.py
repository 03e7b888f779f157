"""task=prepare: token files from text/JSONL/Parquet; deterministic, atomic, idempotent, strict about input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ds_hydra.data import prepare as prep
from ds_hydra.data.corpus import embedded_corpus_text
from ds_hydra.data.prepare_inputs import ReadSettings, resolve_inputs
from ds_hydra.data.tokenizer import load_tokenizer
from ds_hydra.errors import UserError
from tests.conftest import cli_in_process, run_cli

pytest.importorskip("tokenizers")

EOS = "<|endoftext|>"
CHAR = {"kind": "char", "eos_token": EOS}
BPE = {"kind": "bpe", "vocab_size": 512, "min_frequency": 2, "eos_token": EOS, "train_chars": None}


@pytest.fixture(scope="module")
def shakespeare():
    return embedded_corpus_text()


def write_corpus(folder: Path, text: str) -> list:
    """Three text files and a JSONL file; returns the documents in the order prepare reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [text[:150_000], text[150_000:152_000], text[152_000:400_000]]
    for i, doc in enumerate(docs):
        (folder / f"part{i}.txt").write_text(doc, encoding="utf-8")
    records = [text[400_000 + 900 * i: 400_000 + 900 * (i + 1)] for i in range(40)]
    with open(folder / "records.jsonl", "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            f.write(json.dumps({"id": i, "text": record}) + "\n")
            if i == 3:
                f.write("\n")  # a blank line holds no record
    return docs + records


def prepare(folder, output, tokenizer, **kw):
    kw.setdefault("progress", False)
    return prep.prepare_dataset(resolve_inputs([str(folder)]), Path(output), tokenizer, **kw)


def all_tokens(output: Path, meta: dict) -> np.ndarray:
    dtype = np.dtype(meta["dtype"])
    return np.concatenate([np.fromfile(output / name, dtype=dtype) for name in ("train.bin", "val.bin")])


def no_leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
def test_prepared_tokens_decode_to_the_documents_each_followed_by_eos(tmp_path, shakespeare, tokenizer):
    docs = write_corpus(tmp_path / "corpus", shakespeare)
    meta = prepare(tmp_path / "corpus", tmp_path / "out", tokenizer, chunk_bytes=40_000, train_fraction=0.95)
    out = tmp_path / "out"
    tok = load_tokenizer(out)
    tokens = all_tokens(out, meta)
    assert tok.decode(tokens) == "".join(doc + EOS for doc in docs)
    assert meta["documents"] == len(docs) == 43
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    n = len(tokens)
    assert meta["tokens"] == {"train": int(n * 0.95), "val": n - int(n * 0.95)}
    assert [Path(r["path"]).name for r in meta["inputs"]] == ["part0.txt", "part1.txt", "part2.txt", "records.jsonl"]
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    if tokenizer is BPE:
        assert tok.vocab_size == 512 and tok.eos_id == 0
        # a text file cut into several work items encodes as the whole file does
        whole = tok.tokenizer.encode(docs[2], add_special_tokens=False).ids
        start = len(tok.encode(docs[0])) + 1 + len(tok.encode(docs[1])) + 1
        assert tokens[start:start + len(whole)].tolist() == whole
    assert no_leftovers(tmp_path) == []


def test_the_same_bytes_for_any_number_of_workers(tmp_path, shakespeare):
    write_corpus(tmp_path / "corpus", shakespeare)
    for n in (1, 2):
        prepare(tmp_path / "corpus", tmp_path / f"out{n}", BPE, chunk_bytes=30_000, num_proc=n)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json", "tokenizer_meta.json"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name


def test_rerun_on_unchanged_inputs_does_nothing(tmp_path, shakespeare, caplog):
    write_corpus(tmp_path / "corpus", shakespeare)
    first = prepare(tmp_path / "corpus", tmp_path / "out", CHAR)
    stamp = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    os.utime(tmp_path / "corpus" / "part1.txt")  # touched, content unchanged: rehashed, still up to date
    with caplog.at_level("INFO"):
        again = prepare(tmp_path / "corpus", tmp_path / "out", CHAR)
    assert again["up_to_date"] and again["recipe"] == first["recipe"]
    assert "is up to date" in caplog.text and "nothing to do" in caplog.text
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == stamp
    # changed content, or other settings, rebuild
    with open(tmp_path / "corpus" / "part1.txt", "a", encoding="utf-8") as f:
        f.write("more")
    changed = prepare(tmp_path / "corpus", tmp_path / "out", CHAR)
    assert "up_to_date" not in changed and changed["recipe"] != first["recipe"]
    assert "up_to_date" not in prepare(tmp_path / "corpus", tmp_path / "out", CHAR, train_fraction=0.8)
    assert "up_to_date" not in prepare(tmp_path / "corpus", tmp_path / "out", CHAR, train_fraction=0.8, force=True)


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"<unk>": 70_000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text(" ".join(words[::-7]))
    meta = prep.prepare_dataset(resolve_inputs([str(tmp_path / "doc.txt")]), tmp_path / "out",
                                {"kind": "hf", "path": str(tmp_path / "tokenizer.json"), "eos_token": "<unk>"}, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    ids = all_tokens(tmp_path / "out", meta)
    assert ids[:3].tolist() == [69_999, 69_992, 69_985] and ids[-1] == 70_000


def test_parquet_input(tmp_path, shakespeare):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [shakespeare[i * 500:(i + 1) * 500] for i in range(30)]
    pq.write_table(pa.table({"body": texts, "n": list(range(30))}), tmp_path / "docs.parquet", row_group_size=7)
    files = resolve_inputs([str(tmp_path / "docs.parquet")])
    meta = prep.prepare_dataset(files, tmp_path / "out", CHAR, ReadSettings(text_field="body"), progress=False, chunk_bytes=2048)
    assert meta["documents"] == 30
    assert load_tokenizer(tmp_path / "out").decode(all_tokens(tmp_path / "out", meta)) == "".join(t + EOS for t in texts)
    with pytest.raises(UserError, match=r"docs.parquet: no column 'text' \(columns: body, n\); set prepare.text_field"):
        prep.prepare_dataset(files, tmp_path / "out2", CHAR, progress=False)
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "nulls.parquet")
    with pytest.raises(UserError, match="nulls.parquet: row 1: column 'text' is null, not a string"):
        prep.prepare_dataset(resolve_inputs([str(tmp_path / "nulls.parquet")]), tmp_path / "out3", CHAR, progress=False)
    assert not (tmp_path / "out3").exists()


# -- bad input: one line naming the file (and offset), nothing left behind ------------------------------


def bad_case(folder: Path, name: str) -> str:
    """Writes a corpus with one problem; returns the message prepare must give."""
    folder.mkdir()
    (folder / "good.txt").write_text("fine text\n" * 100)
    if name == "empty":
        (folder / "empty.txt").write_bytes(b"")
        return f"{folder / 'empty.txt'}: empty file (0 bytes); remove it from prepare.input"
    if name == "not_utf8":
        (folder / "latin1.txt").write_bytes(b"ok line\n" * 10 + "caf\xe9\n".encode("latin-1"))
        return f"{folder / 'latin1.txt'}: byte 83: not UTF-8 (invalid continuation byte); fix the file or set prepare.errors=replace"
    if name == "not_json":
        (folder / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
        return f"{folder / 'bad.jsonl'}: byte 14: the line is not JSON (Expecting ',' delimiter)"
    if name == "no_field":
        (folder / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b", "id": 2}\n')
        return f"{folder / 'bad.jsonl'}: byte 14: the record has no 'text' field (fields: body, id); set prepare.text_field"
    if name == "not_string":
        (folder / "bad.jsonl").write_text('{"text": 5}\n')
        return f"{folder / 'bad.jsonl'}: byte 0: 'text' is int, not a string"
    if name == "unknown_format":
        (folder / "table.csv").write_text("a,b\n")
        return f"{folder / 'table.csv'}: unsupported input format (.csv); use .txt, .text, .md, .jsonl, .ndjson, .parquet files or set prepare.format"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["empty", "not_utf8", "not_json", "no_field", "not_string", "unknown_format"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, name):
    expected = bad_case(tmp_path / "corpus", name)
    patterns = [str(tmp_path / "corpus" / "*")]
    with pytest.raises(UserError) as raised:
        prep.prepare_dataset(resolve_inputs(patterns), tmp_path / "out", CHAR, progress=False)
    assert str(raised.value) == expected
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_non_utf8_bytes_can_be_replaced(tmp_path):
    bad_case(tmp_path / "corpus", "not_utf8")
    meta = prep.prepare_dataset(resolve_inputs([str(tmp_path / "corpus")]), tmp_path / "out", CHAR,
                                ReadSettings(errors="replace"), progress=False)
    assert "caf\ufffd\n" in load_tokenizer(tmp_path / "out").decode(all_tokens(tmp_path / "out", meta))


def test_a_failure_or_interrupt_keeps_the_previous_output(tmp_path, shakespeare, monkeypatch):
    write_corpus(tmp_path / "corpus", shakespeare)
    prepare(tmp_path / "corpus", tmp_path / "out", CHAR)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = []

    def interrupted_after_two_chunks():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_check_stop", interrupted_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "corpus", tmp_path / "out", BPE, chunk_bytes=20_000)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert no_leftovers(tmp_path) == []


def test_output_that_holds_something_else_is_refused(tmp_path, shakespeare):
    write_corpus(tmp_path / "corpus", shakespeare)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"prepare.output=.*busy: holds files prepare did not write \(notes.md\)"):
        prepare(tmp_path / "corpus", tmp_path / "busy", CHAR)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare(tmp_path / "corpus", tmp_path / "file", CHAR)
    prepare(tmp_path / "corpus", tmp_path / "out", CHAR)
    (tmp_path / "out" / "extra.txt").write_text("added by hand")
    with pytest.raises(UserError, match=r"holds files prepare did not write \(extra.txt\)"):
        prepare(tmp_path / "corpus", tmp_path / "out", CHAR, force=True)
    assert (tmp_path / "busy" / "notes.md").read_text() == "mine"


def test_cli_prepare_then_problems_exit_2_in_one_line(tmp_path, shakespeare):
    write_corpus(tmp_path / "corpus", shakespeare)
    out = tmp_path / "data" / "mine"
    args = [f"prepare.input={tmp_path}/corpus/*.txt", f"prepare.output={out}", "tokenizer=bpe", "tokenizer.vocab_size=300"]
    done = run_cli(["task=prepare", *args, f"hydra.run.dir={tmp_path}/run1"])
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["documents"] == 3
    again = cli_in_process(["task=prepare", *args, f"hydra.run.dir={tmp_path}/run2"])
    assert again.returncode == 0 and "is up to date" in again.stdout + again.stderr
    cases = {
        "tokenizer.vocab_size=100": "ds_hydra: error: tokenizer.vocab_size=100: too small for byte-level BPE; must be >= 257",
        f"prepare.input={tmp_path}/none/*.txt": f"ds_hydra: error: prepare.input={tmp_path}/none/*.txt: matches no files",
        f"prepare.output={tmp_path}/corpus": f"ds_hydra: error: prepare.output={tmp_path}/corpus: holds files prepare did not write",
    }
    for override, message in cases.items():
        bad = cli_in_process(["task=prepare", *args, override, f"hydra.run.dir={tmp_path}/bad"])
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), bad.stderr
    missing = cli_in_process(["task=prepare", f"hydra.run.dir={tmp_path}/bad"])
    assert missing.returncode == 2 and "prepare.input is not set" in missing.stderr and "prepare.output is not set" in missing.stderr
