"""Loading never runs code, saving never leaves a torn file, and every RNG survives the round trip."""
from __future__ import annotations

import errno
import os
import random
import resource

import pytest
import torch

from ds_hydra.errors import UserError
from ds_hydra.training import state as state_io


class Payload:
    """Unpickling this object calls ``exec`` on a line that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "step_0000001.pt"
    torch.save({"format": state_io.TRAIN_STATE_FORMAT, "model": Payload(marker)}, path)

    torch.load(path, weights_only=False)  # what an unsafe loader would do: the payload runs
    assert marker.exists(), "the payload is not malicious, so this test would prove nothing"
    marker.unlink()

    for load in (state_io.safe_torch_load, state_io.load_train_state, lambda p: state_io.safe_torch_load(p, mmap=True)):
        with pytest.raises(UserError, match=r"refused: loading it would call exec ") as refused:
            load(path)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
        assert not marker.exists()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda good: good[: len(good) // 2], "not a PyTorch checkpoint, or truncated"),
        (lambda good: good[:-1], "not a PyTorch checkpoint, or truncated"),
        (lambda good: os.urandom(len(good)), "not a PyTorch checkpoint"),
        (lambda good: b"", "the checkpoint file is empty"),
    ],
    ids=["half", "one byte short", "garbage", "empty"],
)
def test_damaged_files_are_one_line_errors(tmp_path, damage, message):
    path = tmp_path / "step_0000001.pt"
    torch.save({"x": torch.ones(1000)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message) as failed:
        state_io.safe_torch_load(path)
    assert str(path) in str(failed.value) and "\n" not in str(failed.value)


def test_train_state_format_and_keys_are_checked(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(UserError, match="not a ds_hydra training checkpoint"):
        state_io.load_train_state(path)
    torch.save({"format": state_io.TRAIN_STATE_FORMAT, "step": 1, "model": {}}, path)
    with pytest.raises(UserError, match="incomplete training checkpoint .no optimizer, scheduler, data, rng, config"):
        state_io.load_train_state(path)
    with pytest.raises(UserError, match="no such checkpoint file"):
        state_io.safe_torch_load(tmp_path / "missing.pt")


def test_every_rng_round_trips_through_a_weights_only_file(tmp_path):
    np = pytest.importorskip("numpy")
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator state
    path = tmp_path / "rng.pt"
    state_io.atomic_torch_save(state_io.rng_state(), path)
    expected = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3))
    state_io.set_rng_state(state_io.safe_torch_load(path))
    again = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3))
    assert torch.equal(expected[0], again[0]) and expected[1:3] == again[1:3]
    assert (expected[3] == again[3]).all()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    """A real write error (EFBIG from a file-size limit, as a full disk gives ENOSPC) while saving."""
    path = tmp_path / "step_0000001.pt"
    state_io.atomic_torch_save({"x": torch.zeros(10)}, path)
    old = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(OSError) as failed:
            state_io.atomic_torch_save({"x": torch.zeros(1_000_000)}, path)  # 4 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG  # the write's own error, not torch's RuntimeError
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_listing_ignores_temp_files_and_pruning_keeps_the_newest(tmp_path):
    for step in (3, 1, 12, 7):
        state_io.atomic_torch_save({"step": step}, state_io.checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoints" / ".step_0000099.pt.abc.tmp").write_bytes(b"torn")
    assert [state_io.checkpoint_step(p) for p in state_io.list_checkpoints(tmp_path)] == [1, 3, 7, 12]
    state_io.prune_checkpoints(tmp_path, keep_last=2)
    assert [state_io.checkpoint_step(p) for p in state_io.list_checkpoints(tmp_path)] == [7, 12]
    assert state_io.latest_checkpoint(tmp_path) == state_io.checkpoint_path(tmp_path, 12)
