"""Sharded checkpoints (``trainer.checkpoint_format=dcp``): written by every rank, resumed at another world
size with the same parameters and optimizer state bit for bit, written in the background
(``trainer.async_checkpoint``), converted to and from the ``full`` format, loaded safely.

The slow tests save on 2 ranks (torchrun, gloo) and load on 1 and 3: ``dcp_load_probe.py`` writes the
state a freshly loaded trainer holds, which must equal the checkpoint read whole in this process; the
resumed runs' next losses must equal the uninterrupted run's (the global batch stays 12 sequences:
batch 2 x accumulation 3 x 2 ranks = 2 x 6 x 1 = 2 x 2 x 3).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENGINE_RUN, REPO, compose, run_cli

RUN = [*ENGINE_RUN, "scheduler=constant", "trainer.save_every=2", "trainer.keep_last=5"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _env(**extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def same_tree(a, b) -> bool:
    """Equal nested containers, tensors compared exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_state(got, want, exact: bool = True):
    """Model tensors, optimizer state and param groups of two full-format states: equal (or fp32-close)."""
    assert got["model"].keys() == want["model"].keys()
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    for name, tensor in want["model"].items():
        assert same(got["model"][name], tensor), name
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for index, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert same(got["optimizer"]["state"][index][key], value), (index, key)


# -- one process -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps saved as full and as dcp (every 2 steps)."""
    from ds_hydra.training.trainer import train

    root = tmp_path_factory.mktemp("formats")
    for fmt in ("full", "dcp"):
        train(compose([*RUN, f"trainer.checkpoint_format={fmt}"]), run_dir=root / fmt)
    return root


def test_one_process_dcp_holds_what_full_holds_and_resumes_bit_for_bit(runs, tmp_path):
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.state import latest_checkpoint, list_checkpoints
    from ds_hydra.training.trainer import train

    assert [p.name for p in list_checkpoints(runs / "dcp")] == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (runs / "dcp" / "checkpoints" / "step_0000004").iterdir()) == [
        ".metadata", "__0_0.distcp", "rng_rank0.pt", "trainer_state.pt",
    ]
    full = load_checkpoint_state(latest_checkpoint(runs / "full"))
    sharded = load_checkpoint_state(latest_checkpoint(runs / "dcp"))
    assert_same_state(sharded, full)
    for key in ("step", "data", "scheduler", "param_names", "rng"):
        assert same_tree(sharded[key], full[key]), key

    shutil.copytree(runs / "dcp", tmp_path / "resumed")
    train(compose([*RUN, "trainer.checkpoint_format=dcp", f"resume={tmp_path / 'resumed' / 'checkpoints' / 'step_0000002'}"]))
    assert_same_state(load_checkpoint_state(latest_checkpoint(tmp_path / "resumed")), full)


def test_resuming_under_another_optimizer_is_one_line_not_dcp_s_traceback(runs):
    """SGD's momentum buffers are not in an AdamW checkpoint: refused by the trainer's one line naming the
    missing entry (DCP raises a BaseException holding every rank's traceback)."""
    from ds_hydra.errors import UserError
    from ds_hydra.training.state import latest_checkpoint
    from ds_hydra.training.trainer import Trainer

    trainer = Trainer(compose([*RUN, "trainer.checkpoint_format=dcp", "optimizer=sgd"]), runs / "sgd")
    with pytest.raises(UserError, match=r"does not fit this model or optimizer \(Missing key .*momentum_buffer") as refused:
        trainer.load(latest_checkpoint(runs / "dcp"))
    assert "\n" not in str(refused.value)


def test_async_save_returns_a_copy_taken_before_training_goes_on(tmp_path):
    """The background write holds the state of the step it was asked for, whatever training does next;
    keep_last prunes only once the newer checkpoint is complete."""
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.state import list_checkpoints
    from ds_hydra.training.trainer import Trainer

    trainer = Trainer(compose([*RUN, "trainer.async_checkpoint=true", "trainer.keep_last=1"]), tmp_path)
    assert trainer.checkpoint_format == "dcp"  # auto + async: dcp even in one process
    trainer.train_step()
    first = trainer.save()
    trainer.finish_pending_save()
    trainer.train_step()
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    path = trainer.save()
    assert trainer.pending_save is not None
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # training moves on while the write is in flight
    assert list_checkpoints(tmp_path) == [first]  # the older one stays until the newer is complete
    trainer.finish_pending_save()
    assert list_checkpoints(tmp_path) == [path] and trainer.last_saved == path
    saved = load_checkpoint_state(path)["model"]
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


def test_async_staging_refills_one_copy_and_follows_a_changed_layout():
    """Staging copies into buffers allocated once: each save's copy lands in the same memory, holds the state
    as it was at that save, and takes the current non-tensor entries (a scheduled lr); new buffers only when
    the layout changes (the optimizer's moments appear at its first step)."""
    from ds_hydra.training.sharded_checkpoint import StagingBuffers

    staging = StagingBuffers()
    state = {"model": {"w": torch.arange(4.0)}, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    first = staging.stage(state)
    state["model"]["w"].add_(1.0)
    assert torch.equal(first["model"]["w"], torch.arange(4.0))  # a copy, not the live tensor
    buffer = first["model"]["w"].data_ptr()
    state["optimizer"]["param_groups"][0]["lr"] = 0.2
    second = staging.stage(state)
    assert second["model"]["w"].data_ptr() == buffer and torch.equal(second["model"]["w"], torch.arange(4.0) + 1)
    assert second["optimizer"]["param_groups"][0]["lr"] == 0.2
    state["optimizer"]["state"] = {"w": {"step": torch.tensor(1.0), "exp_avg": torch.full((4,), 3.0)}}
    third = staging.stage(state)
    assert torch.equal(third["optimizer"]["state"]["w"]["exp_avg"], torch.full((4,), 3.0))
    assert torch.equal(third["optimizer"]["state"]["w"]["step"], torch.tensor(1.0))
    assert torch.equal(third["model"]["w"], torch.arange(4.0) + 1)


def test_async_save_with_a_quantized_optimizer_state_is_written_in_the_foreground(tmp_path, caplog):
    """torchao's 4-bit optimizer keeps its moments in tensor subclasses that no CPU copy can be made of ahead of
    time (copying shares their storage; allocating one is not implemented): such a save is written before it
    returns, with one warning, instead of failing after the steps it was to keep."""
    pytest.importorskip("torchao")
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.trainer import Trainer

    trainer = Trainer(compose([*RUN, "optimizer=adamw4bit", "trainer.async_checkpoint=true"]), tmp_path)
    trainer.train_step()
    with caplog.at_level("WARNING"):
        first = trainer.save()
        trainer.train_step()
        second = trainer.save()
    assert trainer.pending_save is None and trainer.last_saved == second
    assert [r.getMessage() for r in caplog.records if "in the foreground" in r.getMessage()] == [
        "trainer.async_checkpoint: the optimizer's state holds OptimState4bit tensors, which cannot be copied ahead "
        "for a background write; checkpoints are written in the foreground"
    ]
    saved = load_checkpoint_state(second)
    assert saved["step"] == 2 and first != second
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][name], tensor), name


def test_convert_between_formats_and_load_model_reads_a_sharded_checkpoint(runs, tmp_path):
    from ds_hydra import load_model
    from ds_hydra.training.checkpoint_convert import main
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state

    run = tmp_path / "run"
    shutil.copytree(runs / "dcp", run)
    sharded = run / "checkpoints" / "step_0000004"
    assert main([str(sharded)]) == 0
    as_file = run / "checkpoints" / "step_0000004.pt"
    assert_same_state(load_checkpoint_state(as_file), load_checkpoint_state(sharded))
    assert main([str(as_file), "--out", str(tmp_path / "back" / "step_0000004")]) == 0
    assert_same_state(load_checkpoint_state(tmp_path / "back" / "step_0000004"), load_checkpoint_state(sharded))
    assert main([str(as_file)]) == 2  # step_0000004/ exists: refused, nothing overwritten

    model = load_model(str(sharded))
    for name, tensor in load_checkpoint_state(as_file)["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_sharded_index_that_would_run_code_is_refused(runs, tmp_path):
    from ds_hydra.errors import UserError
    from ds_hydra.training.sharded_checkpoint import read_full_state

    sharded = tmp_path / "step_0000002"
    shutil.copytree(runs / "dcp" / "checkpoints" / "step_0000002", sharded)
    (sharded / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UserError, match=r"\.metadata: refused or damaged \(refused global builtins\.exec\)"):
        read_full_state(sharded)


def test_partial_directories_are_never_checkpoints(tmp_path):
    from ds_hydra.common.checkpoint_files import list_checkpoints, remove_partial_checkpoints

    folder = tmp_path / "checkpoints"
    complete = folder / "step_0000002"
    complete.mkdir(parents=True)
    (complete / ".metadata").write_bytes(b"x")
    (complete / "trainer_state.pt").write_bytes(b"x")
    (folder / ".step_0000004.partial").mkdir()  # a write that a crash interrupted
    (folder / "step_0000006").mkdir()  # a directory without DCP's index is not a checkpoint
    assert list_checkpoints(tmp_path) == [complete]
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000002", "step_0000006"]


def test_checkpoint_format_per_engine_and_refusals():
    from ds_hydra.errors import UserError
    from ds_hydra.training.config import validate_trainer
    from ds_hydra.training.trainer import resolve_checkpoint_format

    tcfg = compose().trainer
    assert [resolve_checkpoint_format(tcfg, name) for name in ("single", "ddp", "fsdp", "deepspeed")] == ["full", "dcp", "dcp", "full"]
    explicit = compose(["trainer.checkpoint_format=dcp"]).trainer
    with pytest.raises(UserError, match="engine=deepspeed keeps DeepSpeed's own checkpoint format"):
        resolve_checkpoint_format(explicit, "deepspeed")
    assert resolve_checkpoint_format(compose(["trainer.checkpoint_format=full"]).trainer, "fsdp") == "full"
    problems = validate_trainer(compose(["trainer.checkpoint_format=full", "trainer.async_checkpoint=true"]).trainer)
    assert problems == [
        "trainer.async_checkpoint=true: needs trainer.checkpoint_format=dcp (a full checkpoint is one file gathered "
        "to rank 0 and written while every rank waits)"
    ]


# -- several ranks (torchrun, gloo) ----------------------------------------------------------------
def _torchrun(nproc: int, *args: str, cwd: Path, module: bool = True) -> subprocess.CompletedProcess:
    target = ["-m", "ds_hydra"] if module else [str(REPO / "tests" / "dcp_load_probe.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400)


def _losses(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_saved_on_two_ranks_resumes_on_one_and_three(tmp_path, engine):
    from ds_hydra.engine.fsdp import fsdp_unsupported
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.state import safe_torch_load

    if engine == "fsdp" and fsdp_unsupported(torch.device("cpu")):
        pytest.skip(fsdp_unsupported(torch.device("cpu")))
    run = [*RUN, "trainer.batch_size=2"]
    whole = tmp_path / "whole"
    proc = _torchrun(2, *run, f"engine={engine}", "trainer.grad_accum_steps=3", f"hydra.run.dir={whole}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = whole / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in saved.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.pt",
    ]
    want = load_checkpoint_state(saved)  # read whole in this process, no process group

    # Loaded on 1 rank (one process) and on 3 (the saving engine): the same tensors, bit for bit.
    for nproc, load_engine, accum in ((1, "auto", 6), (3, engine, 2)):
        out = tmp_path / f"probe{nproc}" / "state.pt"
        out.parent.mkdir()
        args = [str(out), str(saved), *run, f"engine={load_engine}", f"trainer.grad_accum_steps={accum}"]
        proc = _torchrun(nproc, *args, cwd=tmp_path, module=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = safe_torch_load(out)
        assert_same_state(got, want)
        assert got["step"] == 2 and same_tree(got["data"], want["data"]) and same_tree(got["scheduler"], want["scheduler"])

    # Resumed on 1 and on 3 ranks: the next steps' losses and the final state are the uninterrupted run's.
    for nproc, load_engine, accum in ((1, "auto", 6), (3, engine, 2)):
        resumed = tmp_path / f"resumed{nproc}"
        shutil.copytree(whole, resumed)
        checkpoint = resumed / "checkpoints" / "step_0000002"
        overrides = [f"resume={checkpoint}", f"engine={load_engine}", f"trainer.grad_accum_steps={accum}"]
        proc = _torchrun(nproc, *overrides, cwd=tmp_path) if nproc > 1 else run_cli(overrides, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got, uninterrupted = _losses(resumed), _losses(whole)
        assert list(got) == [1, 2, 3, 4]
        assert [got[s] for s in (3, 4)] == pytest.approx([uninterrupted[s] for s in (3, 4)], rel=1e-5)
        final = load_checkpoint_state(max((resumed / "checkpoints").glob("step_0000004*")))
        assert_same_state(final, load_checkpoint_state(whole / "checkpoints" / "step_0000004"), exact=False)


def _start_slow_run(run_dir: Path, *extra: str, delay: float = 3.0) -> subprocess.Popen:
    args = [*RUN, "trainer.max_steps=400", "trainer.async_checkpoint=true", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "slow_checkpoint_writes.py"), *args], cwd=REPO,
        env=_env(SLOW_WRITE_S=str(delay)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_during_an_async_write_leaves_the_previous_checkpoint(tmp_path):
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.state import latest_checkpoint

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    proc = _start_slow_run(run_dir)
    try:
        _wait_for(proc, lambda: (folder / "step_0000002").is_dir() and (folder / ".step_0000004.partial").is_dir())
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest_checkpoint(run_dir) == folder / "step_0000002"  # the partial one is ignored
    assert load_checkpoint_state(folder / "step_0000002")["step"] == 2

    resumed = run_cli([f"resume={run_dir}", "trainer.max_steps=6"], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder / 'step_0000002'} at step 2" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]


@pytest.mark.slow
def test_sigterm_during_an_async_write_exits_75_once_it_is_complete(tmp_path):
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.state import list_checkpoints

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    proc = _start_slow_run(run_dir, delay=4.0)
    try:
        _wait_for(proc, lambda: (folder / ".step_0000002.partial").is_dir())
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert time.time() - sent > 2  # it waited for the write in flight
    saved = list_checkpoints(run_dir)
    assert saved[0] == folder / "step_0000002" and not list(folder.glob(".*"))  # complete, nothing partial
    stopped_at = load_checkpoint_state(saved[-1])["step"]
    assert f"stopped by SIGTERM at step {stopped_at}" in err or "stopped by SIGTERM" in err, err[-2000:]
