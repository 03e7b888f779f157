"""hydra/launcher=torchrun: each job of a run or a sweep under torchrun (gloo on the CPU).

The fast tests check the pieces (torchrun's arguments, each job's command line, how a job's outcome is
read from its ranks' reports); the slow ones run real jobs: a sweep of two 2-rank jobs, a sweep with a
job that fails on one rank, and a single run through the launcher.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENGINE_RUN, REPO
from ds_hydra.cli import torchrun_job
from ds_hydra.cli.torchrun_config import TorchrunSettings
from ds_hydra.cli.torchrun_job import job_arguments, read_outcome
from ds_hydra.common.startup import StartUp
from ds_hydra.errors import ConfigError, UserError

RUN = [*ENGINE_RUN, "trainer.log_interval=2"]


def launcher_config(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ds_hydra.config_store import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=["hydra/launcher=torchrun", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


# -- the pieces ----------------------------------------------------------------------------------------
def test_settings_become_torchruns_arguments():
    one_node = TorchrunSettings.from_config(launcher_config("hydra.launcher.nproc_per_node=2", "hydra.launcher.max_restarts=3"))
    assert one_node.problems() == []
    assert one_node.args(job_key="4") == ["--nproc_per_node=2", "--max_restarts=3", "--standalone"]
    nodes = TorchrunSettings.from_config(launcher_config(
        "hydra.launcher.nproc_per_node=8", "hydra.launcher.nnodes=2", "hydra.launcher.rdzv_endpoint=head:29500",
        "hydra.launcher.rdzv_id=exp7", "hydra.launcher.extra_args=['--monitor_interval=1']"))
    assert nodes.args(job_key="4") == [
        "--nproc_per_node=8", "--max_restarts=0", "--nnodes=2", "--node_rank=0", "--rdzv_backend=c10d",
        "--rdzv_endpoint=head:29500", "--rdzv_id=exp7-4", "--monitor_interval=1",  # every job meets under its own id
    ]


def test_bad_settings_are_named():
    bad = TorchrunSettings.from_config(launcher_config(
        "hydra.launcher.nproc_per_node=two", "hydra.launcher.nnodes=2", "hydra.launcher.max_restarts=-1"))
    assert bad.problems() == [
        "hydra.launcher.nproc_per_node=two: allowed values: auto, gpu, cpu or a number >= 1",
        "hydra.launcher.max_restarts=-1: must be >= 0",
        "hydra.launcher.nnodes=2: several nodes meet at hydra.launcher.rdzv_endpoint=<host:port>; set it",
    ]


def test_a_jobs_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ds_hydra", "-m", "--config-name=other", "optimizer.lr=1e-3,2e-3"])
    hydra_overrides = ["hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", "hydra.sweep.dir=sw", "hydra.verbose=true"]
    job_dir = tmp_path / "sw" / "0"
    args = job_arguments(["optimizer.lr=1e-3", "model=gpt_tiny"], hydra_overrides, job_dir, continue_existing=True)
    # the config flags, the job's overrides, the launching command's other Hydra settings, where it runs
    assert args == ["--config-name=other", "optimizer.lr=1e-3", "model=gpt_tiny", "hydra.verbose=true", f"hydra.run.dir='{job_dir}'"]
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=1e-3\n")
    args = job_arguments(["optimizer.lr=1e-3"], hydra_overrides, job_dir, continue_existing=True)
    assert args[-1] == f"resume='{job_dir}'"  # a re-run sweep continues (or skips) the job


def report(folder: Path, rank: int, at: float, **outcome) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "time": at, **outcome}))


def test_the_rank_that_failed_first_names_the_error(tmp_path):
    reports = tmp_path / ".ranks"
    report(reports, 0, 20.0, status="failed", exit_code=1, error="RuntimeError: Connection closed by peer", traceback="T0")
    report(reports, 1, 10.0, status="failed", exit_code=1, error="RuntimeError: planted", traceback="Traceback: planted\n")
    outcome = read_outcome(reports, 1, tmp_path)
    assert (outcome.completed, outcome.rank, outcome.exit_code) == (False, 1, 1)
    assert outcome.error == f"rank 1: RuntimeError: planted (traceback in {tmp_path / 'rank1.log'})"
    assert (tmp_path / "rank1.log").read_text() == "Traceback: planted\n"  # beside that rank's own log lines


def test_a_completed_job_returns_rank_zeros_metrics(tmp_path):
    reports = tmp_path / ".ranks"
    report(reports, 1, 2.0, status="completed", metrics={"val_loss": 9.0})
    report(reports, 0, 1.0, status="completed", metrics={"val_loss": 1.5})
    outcome = read_outcome(reports, 0, tmp_path)
    assert (outcome.completed, outcome.metrics) == (True, {"val_loss": 1.5})


def test_a_job_killed_without_a_word_still_fails(tmp_path):
    outcome = read_outcome(tmp_path / ".ranks", -9, tmp_path)
    assert not outcome.completed and outcome.exit_code == -9
    assert outcome.error == f"torchrun exited with -9; no rank reported an error (killed?): see {tmp_path}/rank*.log"


def test_a_rank_reports_the_user_error_behind_its_exit(tmp_path, monkeypatch):
    """cli_main prints a UserError and exits 2: the report carries that error, not the SystemExit."""
    monkeypatch.setenv(torchrun_job.RANK_REPORTS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        with torchrun_job.reporting_to_launcher(StartUp()):
            try:
                raise ConfigError(["trainer.max_steps=0: must be >= 1"])
            except UserError:
                sys.exit(2)
    saved = json.loads((tmp_path / "rank1.json").read_text())
    assert (saved["rank"], saved["status"], saved["exit_code"]) == (1, "failed", 2)
    assert saved["error"] == "ConfigError: trainer.max_steps=0: must be >= 1" and "traceback" not in saved


def test_a_failure_is_timed_when_its_rank_tears_the_group_down(tmp_path, monkeypatch):
    """The failing rank's teardown is what makes its peers fail, and its own report can come later (the
    error still travels up through Hydra): the report carries the teardown's time, not the report's."""
    from ds_hydra.engine import process_group

    class Group:  # stands in for torch.distributed
        destroyed = 0

        def destroy_process_group(self):
            self.destroyed += 1

    monkeypatch.setenv(torchrun_job.RANK_REPORTS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    group = Group()
    process_group.leave_process_group(group)  # a clean exit notes nothing
    assert group.destroyed == 1
    with pytest.raises(SystemExit):
        with torchrun_job.reporting_to_launcher(StartUp()):
            try:
                try:
                    raise RuntimeError("planted")
                finally:
                    before = time.time()
                    process_group.leave_process_group(group)  # (the engine's close)
                    after = time.time()
            except RuntimeError:
                try:
                    sys.exit(1)  # (cli_main's way out, the error as its context)
                finally:
                    time.sleep(0.05)  # the error's way up to the report
                    process_group.leave_process_group(group)  # (cli_main's after_hydra: later, not the time reported)
    saved = json.loads((tmp_path / "rank1.json").read_text())
    assert group.destroyed == 3 and saved["error"] == "RuntimeError: planted"
    assert before <= saved["time"] <= after  # the first teardown's time, not the later one's
    # the time travels with the error: a later run in this process starts with nothing noted
    assert process_group.failed_at(None) is None and process_group.failed_at(RuntimeError("next run")) is None


def test_a_stop_signal_starts_no_further_job(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hydra_plugins.ds_hydra_torchrun_launcher import _core
    from omegaconf import OmegaConf

    launcher = SimpleNamespace(
        torchrun={"nproc_per_node": "2"},
        config=OmegaConf.create({"hydra": {"hydra_logging": None, "verbose": False, "sweep": {"dir": str(tmp_path)}}}),
    )
    monkeypatch.setattr("ds_hydra.common.signals.stop_requested", lambda: signal.SIGTERM)
    with pytest.raises(torchrun_job.SweepStopped) as stopped:
        _core.launch(launcher, [["optimizer.lr=1e-3"], ["optimizer.lr=2e-3"]], initial_job_idx=0)
    assert stopped.value.exit_code == 75
    assert str(stopped.value) == (f"stopped by SIGTERM after 0 of 2 jobs; continue with the same command and "
                                  f"hydra.sweep.dir={tmp_path} (finished jobs are skipped)")


# -- real jobs (slow) ----------------------------------------------------------------------------------
def run_ds_hydra(args, cwd: Path, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])  # tests/: the failing model below
    return subprocess.run([sys.executable, "-m", "ds_hydra", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_rows(sweep_dir: Path):
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def jsonl(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_two_rank_run(run_dir: Path) -> None:
    """One run dir for the job's two ranks: a log per rank, one .hydra, rank 0's metrics once per step."""
    assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    assert "rank 1 of 2" in (run_dir / "rank1.log").read_text()
    assert [p.name for p in run_dir.rglob(".hydra")] == [".hydra"]
    steps = [r["step"] for r in jsonl(run_dir) if "loss" in r]
    assert steps == sorted(set(steps)) == [2, 4]


@pytest.mark.slow
def test_a_sweep_of_two_jobs_of_two_ranks_each(tmp_path):
    pytest.importorskip("mlflow")
    sweep_dir = tmp_path / "sweep"
    started = time.perf_counter()
    proc = run_ds_hydra(["-m", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", "optimizer.lr=1e-3,2e-3",
                         *RUN, "logger=[jsonl,mlflow]", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    wall_s = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2 jobs x 2 ranks under torchrun: {wall_s:.1f} s")
    rows = read_rows(sweep_dir)
    assert [(r["overrides"], r["status"]) for r in rows] == [("optimizer.lr=0.001", "completed"), ("optimizer.lr=0.002", "completed")]
    for n, row in enumerate(rows):
        run_dir = sweep_dir / str(n)
        assert_two_rank_run(run_dir)
        final = json.loads((run_dir / "completed.json").read_text())["metrics"]
        assert float(row["val_loss"]) == pytest.approx(final["val_loss"])  # the report has rank 0's metrics
        assert "world size 2" in (run_dir / "rank0.log").read_text()
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # each job trained with its own lr

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    for child in children:  # rank 0 alone logged: one value per step
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [2, 4]


@pytest.mark.slow
def test_a_failed_job_is_reported_with_its_ranks_error_while_the_others_complete(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_ds_hydra(["-m", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", *RUN,
                         "allowed_targets=[failing_model]",
                         "model._target_=failing_model.gpt_failing_on_rank_1,ds_hydra.models.gpt.GPT",
                         f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = f"rank 1: RuntimeError: planted failure on rank 1 (traceback in {sweep_dir / '0' / 'rank1.log'})"
    assert f"ds_hydra: error: 1 of 2 sweep jobs failed (first: JobFailed: {error})" in proc.stderr
    rows = read_rows(sweep_dir)
    assert [(r["status"], r["error"]) for r in rows] == [("failed", f"JobFailed: {error}"), ("completed", "")]
    assert "raise RuntimeError(\"planted failure on rank 1\")" in (sweep_dir / "0" / "rank1.log").read_text()
    assert_two_rank_run(sweep_dir / "1")


@pytest.mark.slow
def test_a_single_run_through_the_launcher(tmp_path):
    proc = run_ds_hydra(["hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", *RUN, "logger=[jsonl,csv]"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert_two_rank_run(run_dir)
    assert (run_dir / "metrics.csv").read_text().count("\n") == 1 + len(jsonl(run_dir))  # rank 0 alone wrote it
    assert json.loads((run_dir / "completed.json").read_text())["metrics"]["step"] == 4


@pytest.mark.slow
def test_a_failing_single_run_exits_with_its_ranks_error(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_ds_hydra(["hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", *RUN, "allowed_targets=[failing_model]",
                         "model._target_=failing_model.gpt_failing_on_rank_1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ds_hydra: error: {run_dir}: the run under torchrun failed: rank 1: RuntimeError: planted failure on rank 1 "
        f"(traceback in {run_dir / 'rank1.log'})"
    )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_the_launcher_composes_with_the_engines(engine, tmp_path):
    import torch

    if engine == "fsdp" and torch.__version__ < (2, 7):
        pytest.skip("FSDP2 on the CPU needs torch >= 2.7")
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    proc = run_ds_hydra(["hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", *RUN, f"engine={engine}",
                         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_two_rank_run(tmp_path / "run")
    assert f"engine {engine}" in (tmp_path / "run" / "rank0.log").read_text()
