"""task=prepare into one output: one writer at a time; what interrupted writers left beside it is removed.

Character tokenizers only, so these run without the tokenizers extra."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_hydra.data import prepare as prep
from ds_hydra.data.prepare_inputs import resolve_inputs
from ds_hydra.common import run_lock

CHAR = {"kind": "char", "eos_token": None}
CHAR_EOS = {"kind": "char", "eos_token": "<|endoftext|>"}


def prepare(corpus: Path, output: Path, tokenizer: dict, **kw):
    return prep.prepare_dataset(resolve_inputs([str(corpus)]), output, tokenizer, progress=False, **kw)


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("to be or not to be, that is the question\n" * 50, encoding="utf-8")
    return folder


@pytest.fixture
def live_process():
    """A process that outlives the test's prepare (a live lock holder); stopped afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def plant_lock(path: Path, pid: int) -> dict:
    """The lock file a prepare running as ``pid`` on this machine holds."""
    record = {**run_lock.holder_record(), "pid": pid, "process_start": run_lock.process_start_time(pid)}
    path.write_text(json.dumps(record))
    return record


def test_a_second_prepare_into_the_same_output_is_refused_in_one_line(tmp_path, corpus, live_process):
    out = tmp_path / "out"
    prepare(corpus, out, CHAR)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lock = tmp_path / ".out.prepare.lock"
    plant_lock(lock, live_process.pid)  # a prepare with another tokenizer is writing it
    with pytest.raises(run_lock.RunLocked) as err:
        prepare(corpus, out, CHAR_EOS, force=True)
    message = str(err.value)
    assert message.startswith(f"prepare.output={out}: in use by another ds_hydra process (pid {live_process.pid} on ")
    assert "\n" not in message and message.endswith("let it finish or stop it, then try again")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    assert lock.exists()  # still the other writer's
    prepare(corpus, tmp_path / "other", CHAR_EOS)  # another output beside it is not locked


def test_the_lock_of_a_dead_prepare_is_taken_over_and_released(tmp_path, corpus):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid runs nothing now
    lock = tmp_path / ".out.prepare.lock"
    plant_lock(lock, proc.pid)
    meta = prepare(corpus, tmp_path / "out", CHAR_EOS)
    assert meta["tokens"]["train"] > 0 and not lock.exists()


def test_hidden_directories_of_interrupted_prepares_are_removed(tmp_path, corpus, caplog):
    """A prepare killed (SIGKILL, power loss) mid-way leaves its staging directory and, mid-publish, the
    output it was replacing; the next prepare into that output removes both, and nothing of others."""
    out = tmp_path / "out"
    staging = tmp_path / ".out.prepare-k1ll3d"
    replaced = tmp_path / ".out.old-abc123"
    not_ours = [tmp_path / ".outer.prepare-xyz", tmp_path / ".other.old-1"]
    for folder in (staging, replaced / "out", *not_ours):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(os.urandom(64))
    with caplog.at_level("INFO", logger="ds_hydra.data.prepare"):
        prepare(corpus, out, CHAR)
    assert not staging.exists() and not replaced.exists()
    assert all(p.is_dir() for p in not_ours)
    assert "removed 2 hidden directories left by interrupted prepares (.out.old-abc123, .out.prepare-k1ll3d)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []


@pytest.mark.slow
def test_two_prepares_at_once_one_writes_the_other_is_refused(tmp_path, corpus):
    """Two processes with different tokenizers: the output is one of them, whole, and the other says why
    it did not write (without the lock both said "wrote" and one silently replaced the other)."""
    (corpus / "big.txt").write_text("abcdefghij " * 400_000, encoding="utf-8")  # a few seconds of work
    script = ("import sys; from pathlib import Path; from ds_hydra.data import prepare as p; "
              "from ds_hydra.data.prepare_inputs import resolve_inputs; from ds_hydra.errors import UserError\n"
              "try:\n"
              f"    p.prepare_dataset(resolve_inputs([{str(corpus)!r}]), Path({str(tmp_path / 'out')!r}), "
              "{'kind': 'char', 'eos_token': sys.argv[1] or None}, progress=False); print('wrote')\n"
              "except UserError as e:\n    print('refused:', e); sys.exit(2)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, eos], stdout=subprocess.PIPE, text=True) for eos in ("", "<eos>")]
    outs = [(p.communicate(timeout=120)[0], p.returncode) for p in procs]
    assert sorted(code for _, code in outs) == [0, 2], outs
    refused = next(out for out, code in outs if code == 2)
    assert f"refused: prepare.output={tmp_path / 'out'}: in use by another ds_hydra process" in refused
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    winner = 0 if outs[0][1] == 0 else 1
    assert meta["tokenizer"]["eos_token"] == (None, "<eos>")[winner]


def test_prepared_files_have_the_mode_of_new_files(tmp_path, corpus):
    before = os.umask(0o002)
    try:
        prepare(corpus, tmp_path / "out", CHAR)
    finally:
        os.umask(before)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o775"
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {"0o664"}
