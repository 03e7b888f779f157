"""Resume: a run interrupted at any step and resumed ends bit for bit where an uninterrupted run ends.

The runs use dropout (the RNG matters) and gradient accumulation (the data position matters), and
are stopped by SIGUSR1, Ctrl-C or a crash at steps that fall inside a log window, before and after
the periodic checkpoints. Also: the CLI's requeue exit code, sweeps that skip finished jobs, NaN
losses that never reach a checkpoint, and a disk that fills up during a save.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, compose, run_cli

# TINY: gpt_tiny, 6 steps, log every 2, evaluate every 3. Checkpoints at 2 and 4 (and the final 6).
RUN = [*TINY, "model.dropout=0.1", "trainer.grad_accum_steps=2", "trainer.save_every=2", "trainer.keep_last=2"]
LOSS_KEYS = ("step", "loss", "lr", "train_loss", "val_loss")  # what must match exactly (not timings)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # CLI runs: on a shared machine spinning worker threads cost 10x


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs use one intra-op thread too (every run compared here uses the same count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_in_process(overrides, run_dir=None):
    from ds_hydra.training.trainer import train

    return train(compose(overrides), run_dir=run_dir)


def loss_records(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in LOSS_KEYS if k in r} for r in records]


def final_state(run_dir: Path):
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load

    return safe_torch_load(latest_checkpoint(run_dir))


def assert_same_state(a, b):
    """Every tensor and number of two training states is identical (torch.equal, not allclose)."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tree(a["scheduler"], b["scheduler"], "scheduler")
    assert_same_tree(a["data"], b["data"], "data")
    assert_same_tree(a["rng"], b["rng"], "rng")


def assert_same_tree(a, b, where, skip_leaf=lambda where: False):
    """Tensors bit for bit, containers key by key, other leaves equal; ``skip_leaf(where)`` leaves out a
    leaf that may differ (e.g. a resumed run's config, which names resume=)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}", skip_leaf)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]", skip_leaf)
    elif not skip_leaf(where):
        assert a == b, (where, a, b)


def interrupt(monkeypatch, step: int, how: str) -> None:
    """Send signal ``how`` right after optimizer step ``step``, or crash inside step ``step``."""
    from ds_hydra.training.trainer import Trainer

    original = Trainer.train_step

    def train_step(self):
        if how == "crash" and self.step + 1 == step:
            raise RuntimeError("simulated crash")  # the process dies during this step: nothing is saved
        loss = original(self)
        if how != "crash" and self.step == step:
            os.kill(os.getpid(), getattr(signal, how))
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    final = train_in_process(RUN, run_dir)
    return run_dir, final


@pytest.mark.parametrize(
    "how,step",
    [
        ("SIGUSR1", 3),  # mid log window, right after an evaluation, between checkpoints 2 and 4
        ("SIGINT", 1),  # Ctrl-C before the first periodic checkpoint
        ("crash", 4),  # killed inside step 4: resumes from checkpoint 2; the step-3 record is redone
    ],
)
def test_interrupted_run_resumes_to_identical_losses_and_weights(tmp_path, monkeypatch, reference, how, step):
    from ds_hydra.common.signals import Stopped
    from ds_hydra.training.state import checkpoint_path, list_checkpoints

    ref_dir, ref_final = reference
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt(patch, step, how)
        with pytest.raises(RuntimeError if how == "crash" else Stopped) as stopped:
            train_in_process(RUN, run_dir)
    if how == "crash":
        assert [r["step"] for r in loss_records(run_dir)] == [2, 3]  # step 3's evaluation is past checkpoint 2
    else:
        assert stopped.value.step == step
        assert stopped.value.checkpoint == checkpoint_path(run_dir, step)
        assert stopped.value.exit_code == (130 if how == "SIGINT" else 75)
        assert f"resume={run_dir}" in str(stopped.value)

    final = train_in_process([*RUN, f"resume={run_dir}"])

    assert loss_records(run_dir) == loss_records(ref_dir)  # same values, no record twice
    for key in ("step", "train_loss", "val_loss"):
        assert final[key] == ref_final[key], key
    assert_same_state(final_state(run_dir), final_state(ref_dir))
    assert [p.name for p in list_checkpoints(run_dir)] == [p.name for p in list_checkpoints(ref_dir)]
    assert json.loads((run_dir / "completed.json").read_text())["metrics"]["val_loss"] == ref_final["val_loss"]


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tmp_path, reference):
    from ds_hydra.training.state import checkpoint_path

    ref_dir, ref_final = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    newest = checkpoint_path(run_dir, 6).read_bytes()
    final = train_in_process([*RUN, f"resume={checkpoint_path(run_dir, 4)}"])
    assert final["val_loss"] == ref_final["val_loss"]
    assert_same_state(final_state(run_dir), final_state(ref_dir))
    assert loss_records(run_dir) == loss_records(ref_dir)
    (aside,) = (run_dir / "checkpoints").glob("superseded_*")
    assert (aside / "step_0000006.pt").read_bytes() == newest  # moved, not deleted
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [6, 6]


def test_a_second_ctrl_c_quits_at_once_without_saving(tmp_path, monkeypatch):
    from ds_hydra.training.trainer import Trainer

    original = Trainer.train_step

    def train_step(self):
        loss = original(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second one raises KeyboardInterrupt right here
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_in_process([*TINY, "trainer.save_every=0"], run_dir)
    assert not (run_dir / "checkpoints").exists()  # nothing saved
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored


def test_sigterm_exits_75_and_resume_continues_from_saved_overrides(tmp_path):
    """Through the real CLI: SIGTERM mid-run saves and exits 75; ``resume=<run>`` alone finishes it."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=20", "trainer.log_interval=1", "trainer.eval_interval=0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **ONE_THREAD}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "ds_hydra", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert f"resume={run_dir}" in err and "stopped by SIGTERM" in err, err
    (saved,) = (run_dir / "checkpoints").glob("step_*.pt")
    stopped_at = int(saved.stem.split("_")[1])
    assert 1 <= stopped_at < 20
    assert not (run_dir / "completed.json").exists()

    resumed = run_cli([f"resume={run_dir}"], env=ONE_THREAD)  # no other override: the run's own come from .hydra/
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[:20] == list(range(1, 21)) and steps[20:] == [20]  # each step once, then the final evaluation
    assert json.loads((run_dir / "completed.json").read_text())["step"] == 20
    assert f"resume='{run_dir}'" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_sweep_rerun_skips_finished_jobs_and_continues_unfinished_ones(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_interval=0", "optimizer.lr=0.001,0.002", f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(args, env=ONE_THREAD)
    assert first.returncode == 0, first.stderr
    done, unfinished = sweep_dir / "0", sweep_dir / "1"
    marker = json.loads((done / "completed.json").read_text())
    # The run's own files; Hydra rewrites .hydra/ and the log, the sweep report its sweep_job.json.
    own = [p for p in done.rglob("*") if p.is_file() and p.suffix != ".log" and ".hydra" not in p.parts and p.name != "sweep_job.json"]
    finished_files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in own}
    reference = torch.load(unfinished / "checkpoints" / "step_0000004.pt", weights_only=True)
    # Job 1 "was pre-empted" after its step-2 checkpoint: no marker, no final checkpoint, no later records.
    (unfinished / "completed.json").unlink()
    (unfinished / "checkpoints" / "step_0000004.pt").unlink()

    second = run_cli(args, env=ONE_THREAD)
    assert second.returncode == 0, second.stderr
    for path, (mtime, data) in finished_files.items():  # the finished job was not run again
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert "finished earlier" in (done / "ds_hydra.log").read_text()
    resumed = torch.load(unfinished / "checkpoints" / "step_0000004.pt", weights_only=True)
    for name in reference["model"]:
        assert torch.equal(resumed["model"][name], reference["model"][name]), name
    assert json.loads((unfinished / "completed.json").read_text())["step"] == 4
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:  # the report still lists the skipped job
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert rows["0"]["status"] == "completed" and float(rows["0"]["val_loss"]) == marker["metrics"]["val_loss"]
    assert rows["1"]["status"] == "completed"


def test_nan_loss_stops_naming_the_step_and_never_saves_the_broken_state(tmp_path, monkeypatch, reference):
    from ds_hydra.training.nonfinite import NonFiniteLoss
    from ds_hydra.training.state import checkpoint_path, list_checkpoints

    poison_losses(monkeypatch, steps={5}, accum=2)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as diverged:
        train_in_process(RUN, run_dir)
    message = str(diverged.value)
    assert "loss is nan at step 5" in message and str(checkpoint_path(run_dir, 4)) in message
    assert diverged.value.exit_code == 3
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002.pt", "step_0000004.pt"]
    assert all(torch.isfinite(t).all() for t in final_state(run_dir)["model"].values())
    assert all("nan" not in json.dumps(r) for r in loss_records(run_dir))
    ref_dir, _ = reference  # the last good checkpoint is exactly the uninterrupted run's step 4
    from ds_hydra.training.state import safe_torch_load

    good = safe_torch_load(checkpoint_path(run_dir, 4))
    ref4 = [r for r in loss_records(ref_dir) if r["step"] <= 4]
    assert [r for r in loss_records(run_dir) if r["step"] <= 4] == ref4
    assert good["step"] == 4


def test_skip_nonfinite_drops_bad_steps_up_to_the_limit(tmp_path, monkeypatch):
    from ds_hydra.training.nonfinite import NonFiniteLoss

    poison_losses(monkeypatch, steps={3}, accum=2)
    final = train_in_process([*RUN, "trainer.skip_nonfinite=1"], tmp_path / "one")
    assert final["step"] == 6 and all(torch.isfinite(t).all() for t in final_state(tmp_path / "one")["model"].values())

    poison_losses(monkeypatch, steps={3, 5}, accum=2)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 5 after skipping 1"):
        train_in_process([*RUN, "trainer.skip_nonfinite=1"], tmp_path / "two")


def poison_losses(monkeypatch, steps, accum):
    """Make the training loss NaN in the given optimizer steps (1-based), whatever the weights."""
    from torch._subclasses.fake_tensor import FakeTensor

    from ds_hydra.loss.cross_entropy import CrossEntropyLoss

    original = CrossEntropyLoss.forward
    calls = {"n": 0}

    def forward(self, model, batch):
        loss = original(self, model, batch)
        # a training micro-batch: evaluation runs without gradients, the memory preflight on fake tensors
        if torch.is_grad_enabled() and not isinstance(loss, FakeTensor):
            calls["n"] += 1
            if (calls["n"] - 1) // accum + 1 in steps:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(CrossEntropyLoss, "forward", forward)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from ds_hydra.errors import UserError
    from ds_hydra.training.state import checkpoint_path

    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".step_"):  # checkpoint temp files only
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as full:
        train_in_process(RUN, run_dir)
    message = str(full.value)
    assert "No space left on device" in message and f"{checkpoint_path(run_dir, 2)} is intact" in message
    assert f"resume={run_dir}" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002.pt"]  # no temp file left
    assert final_state(run_dir)["step"] == 2


def test_on_a_full_disk_lowering_keep_last_and_resuming_frees_the_space(tmp_path, monkeypatch, caplog):
    """A disk with room for two checkpoints. keep_last=3 fills it and the step-6 save fails (deleting
    anything then would go beyond what keep_last allows); the advice, lower trainer.keep_last and resume,
    now works: the save deletes first what keep_last=2 would delete after it, never the newest."""
    from ds_hydra.errors import UserError
    from ds_hydra.training.state import checkpoint_path, list_checkpoints

    real_fsync = os.fsync
    run_dir = tmp_path / "run"

    def fsync(fd):  # the disk holds two checkpoints: a third write fails as a full disk does
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".step_") and len(list_checkpoints(run_dir)) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserError) as full:
        train_in_process([*RUN, "trainer.keep_last=3"], run_dir)
    assert "lower trainer.keep_last" in str(full.value) and f"{checkpoint_path(run_dir, 4)} is intact" in str(full.value)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002.pt", "step_0000004.pt"]
    with caplog.at_level("WARNING", logger="ds_hydra.training.trainer"):
        train_in_process([*RUN, "trainer.keep_last=2", f"resume={run_dir}"])
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004.pt", "step_0000006.pt"]
    assert final_state(run_dir)["step"] == 6
    assert f"{checkpoint_path(run_dir, 6)}: the disk is full; deleted step_0000002.pt first" in caplog.text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000004.pt", "step_0000006.pt"]


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGUSR1 reaches only rank 1; the all-reduced flag stops both ranks after the same step, rank 0
    saves that step's checkpoint and the ranks exit 75 (torchrun itself then exits 1)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **ONE_THREAD}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*TINY, "trainer.max_steps=2000", "trainer.log_interval=1", "trainer.eval_interval=0", "engine=ddp",
            "trainer.checkpoint_format=full", f"hydra.run.dir={run_dir}"]  # one file to look for (sharded: a folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ds_hydra", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = sorted(int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGUSR1)  # one rank only
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = [line for line in err.splitlines() if line.startswith("ds_hydra: stopped by SIGUSR1 after step")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-3000:]  # both ranks, the same step
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*.pt")] == [f"step_{step:07d}.pt"]
    # torchrun reports the first rank to exit (75) and then stops the other one itself
    assert "exitcode  : 75" in err and proc.returncode != 0, err[-3000:]


def _torchrun_env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **ONE_THREAD}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.slow
def test_torchrun_restart_continues_the_run_it_interrupted(tmp_path):
    """torchrun --max-restarts=1 without hydra.run.dir: SIGUSR1 to one worker stops both (exit 75),
    torchrun restarts them, and they continue the same run from its checkpoint (no second run dir),
    ending with the weights of an uninterrupted 2-rank run."""
    args = [*TINY, "trainer.max_steps=300", "trainer.batch_size=16", "trainer.log_interval=1", "trainer.eval_interval=0",
            "engine=ddp", "trainer.checkpoint_format=full"]  # final_state reads one file
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*head, "--max-restarts=1", "-m", "ds_hydra", *args], cwd=tmp_path, env=_torchrun_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        metrics = lambda: [p for p in (tmp_path / "outputs").glob("*/*/metrics.jsonl") if p.read_text().strip()]  # noqa: E731
        while not ((tmp_path / "outputs").is_dir() and metrics()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = sorted(int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        os.kill(workers[-1], signal.SIGUSR1)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    runs = [p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra")]
    assert len(runs) == 1, runs  # the restart continued the run instead of starting another
    run_dir = runs[0]
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)", err).group(1))
    assert 0 < stopped < 300 and f"torchrun restart 1: continuing {run_dir.resolve()}" in err
    # the same run without the interruption, in one go
    whole = tmp_path / "whole"
    done = subprocess.run([*head, "-m", "ds_hydra", *args, f"hydra.run.dir={whole}"], cwd=tmp_path, env=_torchrun_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert loss_records(run_dir) == loss_records(whole)  # the interrupted tail was recomputed, not logged twice
    assert_same_state(final_state(run_dir), final_state(whole))


def test_the_seed_sets_every_generator_a_checkpoint_records(tmp_path):
    """Python's and NumPy's generators start from trainer.seed too, so the RNG state a checkpoint
    records is the same in two runs with one seed (a model or dataset drawing from them repeats)."""
    import random

    import numpy as np

    from ds_hydra.training.trainer import Trainer

    draws = []
    for attempt in range(2):
        random.seed(attempt)  # whatever state the process had before
        np.random.seed(attempt)
        Trainer(compose([*TINY, "trainer.seed=5"]), tmp_path / str(attempt))
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    # the Trainer drew parameters from torch after seeding; Python's and NumPy's next draws are the seed's first
    random.seed(5)
    np.random.seed(5)
    assert draws[0][:2] == (random.random(), float(np.random.rand()))


def _with_hydra(overrides):
    """The composed config with its ``hydra`` node, as preflight sees it (``${now:}`` resolvable)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_a_restarted_torchrun_attempt_finds_its_run_by_the_directory(tmp_path, monkeypatch):
    """Fixed hydra.run.dir: that directory once it holds the run's overrides. A name from the clock: the
    run whose torchrun_job.json names this job (its rendezvous id; for the default id 'none' also the
    agent process), among the directories the pattern names."""
    import json

    from ds_hydra.training.resume.torchrun_restart import JOB_FILE, record_job, run_to_continue, this_job

    def make_run(path, wrote_overrides=True, **job):
        (path / ".hydra").mkdir(parents=True)
        if wrote_overrides:
            (path / ".hydra" / "overrides.yaml").write_text("[]\n")
        if job:
            (path / JOB_FILE).write_text(json.dumps(job))
        return path

    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # _with_hydra sets it: restored after the test
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    fixed = tmp_path / "fixed"
    fixed_dir, fixed_and_resume, from_the_clock = (
        _with_hydra(o) for o in ([f"hydra.run.dir={fixed}"], [f"hydra.run.dir={fixed}", f"resume={fixed}"], []))
    assert run_to_continue(fixed_dir) is None  # a first attempt starts anew
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert run_to_continue(fixed_dir) is None  # the first attempt wrote nothing
    make_run(fixed)
    assert run_to_continue(fixed_dir) == fixed
    assert run_to_continue(fixed_and_resume) is None  # resume= says it

    outputs = tmp_path / "outputs"
    make_run(outputs / "2024-05-01" / "23-59-59", **{**this_job(), "run_id": "job-6"})  # another job's run
    ours = make_run(outputs / "2024-05-01" / "23-59-58")
    record_job(ours)  # what rank 0 of the first attempt wrote
    make_run(outputs / "2024-05-02" / "00-00-01", wrote_overrides=False, **{**this_job(), "run_id": "job-7"})  # not a run yet
    assert json.loads((ours / JOB_FILE).read_text())["restart"] == 1
    assert run_to_continue(from_the_clock) == Path("outputs/2024-05-01/23-59-58")  # across midnight too

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id: only this agent's own run
    assert run_to_continue(from_the_clock) is None
    other_agent = make_run(outputs / "2024-05-03" / "01-00-00", **{**this_job(), "run_id": "none", "agent_pid": 1})
    assert run_to_continue(from_the_clock) is None, other_agent
    mine = make_run(outputs / "2024-05-03" / "01-00-01", **{**this_job(), "run_id": "none"})
    assert run_to_continue(from_the_clock) == Path("outputs/2024-05-03/01-00-01") == Path(os.path.relpath(mine))


def test_resume_of_a_run_that_did_not_train_says_so_in_one_line(tmp_path):
    """resume=<a task=prepare run dir> used to re-run the prepare; now it says there is nothing to continue."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 20, encoding="utf-8")
    run = tmp_path / "prepare_run"
    prepared = run_cli(["task=prepare", f"prepare.input={corpus}", f"prepare.output={tmp_path / 'data'}", "tokenizer=char",
                        f"hydra.run.dir={run}"], cwd=tmp_path, env=ONE_THREAD)
    assert prepared.returncode == 0, prepared.stderr
    meta_before = (tmp_path / "data" / "meta.json").stat().st_mtime_ns
    proc = run_cli([f"resume={run}"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ds_hydra: error: resume={run}: a task=prepare run, not a training run: there is nothing to continue "
        "(run the same task=... command again instead)"]
    assert (tmp_path / "data" / "meta.json").stat().st_mtime_ns == meta_before


def test_the_task_of_a_run_dir_comes_from_its_saved_config_then_its_overrides(tmp_path):
    from ds_hydra.training.resume.command_line import saved_task

    (tmp_path / ".hydra").mkdir()
    assert saved_task(tmp_path, []) == "train"
    assert saved_task(tmp_path, ["task=validate", "model=gpt_tiny"]) == "validate"
    (tmp_path / ".hydra" / "config.yaml").write_text("task: eval\nmodel: {}\n")  # e.g. set by an experiment preset
    assert saved_task(tmp_path, ["model=gpt_tiny"]) == "eval"
