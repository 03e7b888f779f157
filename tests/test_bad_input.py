"""Bad input through the real CLI: one clear line, a non-zero exit, no traceback, and no harm done.

Each refusal of the command line is tested here once (a refusal reached through another door, such as
``resume=``, ``+key=``, ``task=validate`` or ``--help``, is a case of its own); the DeepSpeed JSON file's
refusals are in test_deepspeed_import.py. Every case is one ``cli_main`` call in this process (the code
``python -m ds_hydra`` runs); one case runs as a real process, for its exit code and its one line on
stderr. Most point at (or resume) a finished run, and the test checks that nothing in that run changed:
every file has the same bytes and modification time (the job log may only have grown). Cases that need
a damaged run get their own copy of it.
"""
from __future__ import annotations

import hashlib
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, cli_in_process, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RUN = [*TINY, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_interval=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4, completion marker)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli([*RUN, f"hydra.run.dir={run_dir}"], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def snapshot(folder: Path):
    return {
        p.relative_to(folder): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.read_bytes() if p.suffix == ".log" else b"")
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_unchanged(before, after):
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for name, (digest, mtime, text) in before.items():
        if name.suffix == ".log":  # the job log may only grow
            assert after[name][2].startswith(text), name
        else:
            assert after[name][:2] == (digest, mtime), name


def assert_one_line(proc, code, *fragments):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("ds_hydra: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- the run directory is a finished run, left untouched ------------------------------------------------
# (arguments with {run} pointing at it, fragments the error line must contain)
UNTOUCHED = {
    # typos at every level, also when resuming
    "top-level typo": (["hydra.run.dir={run}", "seeed=1"], ["seeed: unknown key", "allowed keys:", "trainer"]),
    "group key typo": (["hydra.run.dir={run}", "trainer.max_stepz=3"], ["trainer.max_stepz", "did you mean 'max_steps'"]),
    "typo added with +": (["hydra.run.dir={run}", "+trainer.max_stepz=3"], ["trainer.max_stepz: unknown key (did you mean 'max_steps'?); allowed keys: max_steps"]),
    # the optimizer's keys bind to its class's signature (before the run dir or any model exists)
    "optimizer argument typo": (["hydra.run.dir={run}", "optimizer.lrr=0.1"], ["optimizer.lrr", "torch.optim.AdamW has no argument 'lrr'", "did you mean 'lr'", "it takes:"]),
    "nested key typo": (["resume={run}", "inference.tensor_parallel.tp_sizee=2"], ["inference.tensor_parallel.tp_sizee", "did you mean 'tp_size'"]),
    "typo when resuming": (["resume={run}", "model.n_layr=2"], ["model.n_layr", "did you mean 'n_layer'"]),
    "group name typo": (["hydra.run.dir={run}", "optimzer=adam"], ["optimzer: unknown key", "did you mean 'optimizer'"]),
    # wrong types
    "string for an int": (["hydra.run.dir={run}", "trainer.max_steps=ten"], ["trainer.max_steps", "'ten'", "Integer"]),
    "string for a bool": (["resume={run}", "model.bias=maybe"], ["model.bias", "'maybe'", "bool"]),
    "number for a list": (["hydra.run.dir={run}", "optimizer.betas=0.9"], ["optimizer.betas", "list"]),
    "unknown enum value": (["resume={run}", "trainer.precision=fp8"], ["trainer.precision", "allowed values", "bf16"]),
    # unknown group options
    "unknown option": (["hydra.run.dir={run}", "optimizer=adamm"], ["optimizer=adamm: no such config option", "did you mean 'adam'", "sgd"]),
    "unknown experiment": (["resume={run}", "experiment=nope"], ["experiment=nope: no such config option", "nanogpt_cpu"]),
    # out of range
    "negative lr": (["hydra.run.dir={run}", "optimizer.lr=-0.1"], ["optimizer.lr=-0.1", "must be > 0"]),
    "zero batch": (["resume={run}", "trainer.batch_size=0"], ["trainer.batch_size=0", "must be >= 1"]),
    "segments > blocks": (["hydra.run.dir={run}", "ckpt.segments=9"], ["ckpt.segments=9", "0..4"]),
    "warmup longer than training": (["resume={run}", "scheduler.warmup_steps=10"], ["scheduler.warmup_steps=10", "warmup longer than training", "trainer.max_steps=4"]),
    "heads do not divide width": (["hydra.run.dir={run}", "model.n_head=3"], ["model.n_embd=32", "divisible by model.n_head=3"]),
    "negative skip_nonfinite": (["resume={run}", "trainer.skip_nonfinite=-1"], ["trainer.skip_nonfinite=-1", "must be >= 0"]),
    # conflicting options
    "fp16 on the CPU": (["hydra.run.dir={run}", "trainer.device=cpu", "trainer.precision=fp16"], ["trainer.precision=fp16", "needs CUDA", "fp32 or bf16"]),
    "checkpoint_last without segments": (["resume={run}", "ckpt.checkpoint_last=true"], ["ckpt.checkpoint_last=true", "applies only with ckpt.segments"]),
    "two recompute policies": (["hydra.run.dir={run}", "ckpt.full=true", "ckpt.every_n=2"], ["ckpt.full", "ckpt.every_n", "set one"]),
    # run directories
    "existing run without resume": (["hydra.run.dir={run}"], ["hydra.run.dir={run}: already holds a run", "resume={run}"]),
    "task=resume without a run": (["task=resume"], ["task=resume", "resume=<run dir>"]),
    "resume a missing checkpoint": (["resume={run}/checkpoints/step_0000099.pt"], ["step_0000099.pt: no such checkpoint file"]),
    "resume a file": (["resume={run}/metrics.jsonl"], ["metrics.jsonl: a file, not a run directory"]),
    "resume a folder that is no run": (["resume={run}/checkpoints"], ["checkpoints: not a run directory", ".hydra/overrides.yaml"]),
    "resume with -m": (["-m", "resume={run}"], ["continues a single run", "hydra.sweep.dir"]),
    "run dir under a file": (["hydra.run.dir={run}/metrics.jsonl/new"], ["hydra.run.dir={run}/metrics.jsonl/new: cannot write there", "metrics.jsonl is a file, not a directory"]),
}


def untouched_case(case, finished):
    args, fragments = UNTOUCHED[case]
    args = [a.format(run=finished) for a in args]
    resuming = any(a.startswith("resume=") or a == "task=resume" for a in args)
    return (args if resuming else [*RUN, *args]), [f.format(run=finished) for f in fragments]  # a resumed run brings its own overrides


@pytest.mark.parametrize("case", list(UNTOUCHED))
def test_bad_input_leaves_the_finished_run_untouched(finished, case):
    args, fragments = untouched_case(case, finished)
    before = snapshot(finished)
    assert_one_line(cli_in_process(args), 2, *fragments)
    assert_unchanged(before, snapshot(finished))


def test_a_refusal_from_the_command_itself_is_exit_2_and_one_line(finished):
    """The real process (``python -m ds_hydra``): exit code 2, one line on stderr, no traceback."""
    args, fragments = untouched_case("group key typo", finished)
    before = snapshot(finished)
    assert_one_line(run_cli(args, env=ONE_THREAD), 2, *fragments)
    assert_unchanged(before, snapshot(finished))


# several problems of one config: one message listing every one (a run, and task=validate's own report)
SEVERAL = {
    "a run": (["hydra.run.dir={run}", "trainer.max_steps=0", "optimizer.lr=-1", "model.dropout=1.5"],
              ["ds_hydra: error: 3 config problems:", "trainer.max_steps=0: must be >= 1", "optimizer.lr=-1.0: must be > 0", "model.dropout=1.5"]),
    "task=validate": (["task=validate", "hydra.run.dir={run}_validate", "ckpt.segments=7", "model.n_head=3"],
                      ["ds_hydra: error: 2 config problems:", "model.n_embd=32: must be divisible by model.n_head=3", "ckpt.segments=7: must be 0..4"]),
}


@pytest.mark.parametrize("case", list(SEVERAL))
def test_several_problems_are_reported_together(finished, case):
    args, fragments = SEVERAL[case]
    before = snapshot(finished)
    proc = cli_in_process([*RUN, *(a.format(run=finished) for a in args)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert_unchanged(before, snapshot(finished))


def test_a_live_run_is_neither_resumed_nor_launched_into(finished):
    """Another process holds the run's lock: both commands are refused naming it, and touch nothing."""
    from test_run_dirs import record_of, write_lock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        before = snapshot(finished)
        lock = write_lock(finished, **record_of(holder.pid, since_text="2024-05-01 12:00:03"))
        for args in ([f"resume={finished}"], [*RUN, f"hydra.run.dir={finished}"]):
            proc = cli_in_process(args)
            assert_one_line(proc, 2, f"in use by another ds_hydra process (pid {holder.pid} on {socket.gethostname()}, "
                                     f"since 2024-05-01 12:00:03; lock {finished}/run.lock)", "let it finish or stop it")
        lock.unlink()
        assert_unchanged(before, snapshot(finished))
    finally:
        (finished / "run.lock").unlink(missing_ok=True)
        holder.kill()
        holder.wait()


def test_unwritable_run_dir_under_proc(tmp_path):
    proc = cli_in_process([*TINY, "hydra.run.dir=/proc/ds_hydra_run"])
    assert_one_line(proc, 2, "hydra.run.dir=/proc/ds_hydra_run: cannot write there", "choose a writable directory")


def test_missing_resume_dir_and_missing_data_file(tmp_path):
    proc = cli_in_process([f"resume={tmp_path}/nope"])
    assert_one_line(proc, 2, f"resume={tmp_path}/nope: no such run directory")
    proc = cli_in_process([*TINY, f"data.path={tmp_path}/missing.txt", f"hydra.run.dir={tmp_path}/run"])
    assert_one_line(proc, 2, f"data.path={tmp_path}/missing.txt: no such file")
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()  # a run that failed to start writes no record


# -- a damaged copy of the run: the newest checkpoint, or the saved overrides ----------------------------
def _plant_bytes(data: bytes):
    def plant(run: Path):
        (run / "checkpoints" / "step_0000099.pt").write_bytes(data)
    return plant


def _truncated(run: Path):
    good = (run / "checkpoints" / "step_0000004.pt").read_bytes()
    (run / "checkpoints" / "step_0000099.pt").write_bytes(good[: len(good) // 2])


def _other_model_config(run: Path):
    """A checkpoint saved by a wider model (its config says so)."""
    import torch

    state = torch.load(run / "checkpoints" / "step_0000004.pt", weights_only=True)
    state["config"] = state["config"].replace("n_embd: 32", "n_embd: 64")
    torch.save(state, run / "checkpoints" / "step_0000099.pt")


def _other_model_tensors(run: Path):
    """A checkpoint whose config matches but whose tensors have another shape."""
    import torch

    state = torch.load(run / "checkpoints" / "step_0000004.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][name] = torch.zeros(7, 3)
    torch.save(state, run / "checkpoints" / "step_0000099.pt")


def _overrides(text: str):
    def plant(run: Path):
        (run / ".hydra" / "overrides.yaml").write_text(text)
    return plant


SLOW_DAMAGED = {"checkpoint of another model (tensors)", "run dir names a foreign _target_"}  # these build the model
DAMAGED = {
    "truncated checkpoint": (_truncated, [], ["step_0000099.pt: not a PyTorch checkpoint, or truncated"]),
    "garbage checkpoint": (_plant_bytes(os.urandom(4096)), [], ["step_0000099.pt: not a PyTorch checkpoint"]),
    "empty checkpoint": (_plant_bytes(b""), [], ["step_0000099.pt: the checkpoint file is empty"]),
    "checkpoint of another model (config)": (_other_model_config, [], ["step_0000099.pt: saved by a different model", "model.n_embd=64 there, 32 here"]),
    "checkpoint of another model (tensors)": (_other_model_tensors, [], ["step_0000099.pt: does not fit this model", "size mismatch"]),
    "garbage overrides.yaml": (_overrides("{unclosed: [\n"), [], [".hydra/overrides.yaml: cannot read the run's overrides"]),
    "overrides.yaml not a list": (_overrides("model: gpt_tiny\n"), [], [".hydra/overrides.yaml: not a list of overrides"]),
    "run dir widens the allowlist": (_overrides("- model=gpt_tiny\n- allowed_targets=[os]\n"), [], ["sets allowed_targets=[os]", "may not widen the _target_ allowlist"]),
    "run dir names a foreign _target_": (_overrides("- model=gpt_tiny\n- data._target_=os.system\n"), [], ["_target_=os.system: not an allowed target", "allowed_targets"]),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_DAMAGED else c for c in DAMAGED])
def test_damaged_run_is_refused_and_left_as_it_was(finished, tmp_path, case):
    plant, extra, fragments = DAMAGED[case]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "completed.json").unlink()  # as if it had been interrupted: resume has to load the newest checkpoint
    plant(run)
    before = snapshot(run)
    proc = cli_in_process([f"resume={run}", *extra])
    assert_one_line(proc, 2, *fragments)
    assert_unchanged(before, snapshot(run))


def test_malicious_checkpoint_is_refused_and_runs_nothing(finished, tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "completed.json").unlink()
    state = torch.load(run / "checkpoints" / "step_0000004.pt", weights_only=True)
    state["model"] = Payload()
    torch.save(state, run / "checkpoints" / "step_0000099.pt")
    before = snapshot(run)
    proc = cli_in_process([f"resume={run}"])
    assert_one_line(proc, 2, "step_0000099.pt: refused: loading it would call exec ")
    assert not marker.exists()
    assert_unchanged(before, snapshot(run))


@pytest.mark.slow
def test_diverging_run_names_the_step_and_saves_nothing(tmp_path):
    run = tmp_path / "run"
    proc = run_cli([*TINY, "optimizer=sgd", "optimizer.lr=1e30", "trainer.grad_clip=0", "trainer.save_every=1", f"hydra.run.dir={run}"], env=ONE_THREAD)
    line = assert_one_line(proc, 3, "loss is nan at step 2", "Lower optimizer.lr", "trainer.skip_nonfinite")
    assert "the last good checkpoint is" in line and "step_0000001.pt" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001.pt"]  # nothing after step 1


@pytest.mark.slow
def test_full_disk_keeps_every_checkpoint(finished, tmp_path):
    """A file-size limit makes the checkpoint write fail as a full disk would (EFBIG instead of ENOSPC)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run / "checkpoints")
    size = (run / "checkpoints" / "step_0000004.pt").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # inherited by the child only while it runs
    try:
        proc = run_cli([f"resume={run}", "trainer.max_steps=6"], env=ONE_THREAD)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line(proc, 2, "step_0000006.pt: cannot write the checkpoint (File too large)", "step_0000004.pt is intact", f"resume={run}")
    assert_unchanged(before, snapshot(run / "checkpoints"))  # no torn or temp file left behind


def test_full_traceback_only_with_hydra_full_error(finished):
    """HYDRA_FULL_ERROR=1: the error leaves cli_main as itself (Python prints its traceback), not as one line."""
    from ds_hydra.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optimizer\.lr=-1"):
        cli_in_process([f"hydra.run.dir={finished}", "optimizer.lr=-1"], env={"HYDRA_FULL_ERROR": "1"})
