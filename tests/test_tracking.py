"""Experiment tracking: several loggers at once, W&B offline and MLflow read back as their users would,
resume into the same tracker runs, sweep grouping, failures that cost a warning, missing extras."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, compose, run_cli
from ds_hydra.tracking.base import Tracker
from ds_hydra.tracking.config import chosen_trackers
from tracker_files import metric_rows, mlflow_history, wandb_runs

RUN = [*TINY, "trainer.save_every=2", "trainer.keep_last=5"]


def jsonl(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_metrics(run_dir: Path):
    return json.loads((run_dir / "completed.json").read_text())["metrics"]


def mlflow_client(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}")


# -- composition -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, chosen", [
    ([], []),
    (["logger=tensorboard"], ["tensorboard"]),  # the spelling scripts already use keeps working
    (["logger.tensorboard=true"], ["tensorboard"]),
    (["logger=[jsonl,csv,tensorboard,wandb,mlflow]"], ["csv", "tensorboard", "wandb", "mlflow"]),
    (["logger=[mlflow,jsonl]"], ["mlflow"]),
    (["logger=wandb"], ["wandb"]),  # metrics.jsonl is written anyway
])
def test_logger_takes_several_options(overrides, chosen):
    assert chosen_trackers(compose(overrides).logger) == chosen


def test_bad_wandb_mode_is_one_line(tmp_path):
    proc = run_cli([*TINY, "logger=[jsonl,wandb]", "logger.wandb.mode=onlin", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "ds_hydra: error: logger.wandb.mode: Invalid value 'onlin'; allowed values: offline, online"
    )


@pytest.mark.parametrize("extra", ["wandb", "mlflow"])
def test_missing_extra_fails_in_one_line_before_training(extra, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"logger=[jsonl,{extra}]", f"hydra.run.dir={run_dir}"]
    code = f"import sys; sys.modules[{extra!r}] = None; sys.argv = ['ds_hydra', *{args!r}]; from ds_hydra.cli import cli_main; cli_main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**_env(), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ds_hydra: error: logger={extra}: needs the {extra} package, which is not installed: pip install 'ds-hydra[{extra}]'"
    ]
    assert not run_dir.exists()  # refused before Hydra made the run dir


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}


# -- the CSV file and the run's title ------------------------------------------------------------------
def test_csv_mirrors_the_jsonl_and_widens_its_header(tmp_path):
    import csv

    from ds_hydra.tracking.base import RunInfo
    from ds_hydra.tracking.csv_file import CsvTracker

    tracker = CsvTracker()
    tracker.start(RunInfo(run_dir=tmp_path, name="x", config={}, params={}, records=[{"step": 1, "loss": 2.5}]))
    tracker.log(2, {"loss": 2.0, "lr": 0.1})  # a new column: the file is rewritten with the wider header
    tracker.log(3, {"loss": 1.5, "lr": 0.05})  # appended
    tracker.finish({}, [], "finished")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))
    assert rows == [{"step": "1", "loss": "2.5", "lr": ""}, {"step": "2", "loss": "2.0", "lr": "0.1"},
                    {"step": "3", "loss": "1.5", "lr": "0.05"}]


def test_loss_curve_title_says_what_the_run_was(tmp_path):
    from ds_hydra.training.metrics import run_title

    assert run_title("baseline", tmp_path / "run") == f"baseline\n{tmp_path / 'run'}"
    assert run_title(None, tmp_path / "run") == f"default config ({tmp_path / 'run'})"


def test_the_loss_curve_is_drawn_once_two_steps_are_logged(tmp_path):
    """One logged step is no curve: nothing is drawn (and no tracker is handed a missing file)."""
    from ds_hydra.training.slices import tracked_run
    from ds_hydra.training.metrics import LOSS_CURVE_FILE, MetricsLogger

    cfg = compose(TINY)
    for steps, drawn in (([5], False), ([5, 5], False), ([5, 6], True)):
        run_dir = tmp_path / "-".join(map(str, steps))
        run_dir.mkdir()
        metrics = MetricsLogger(run_dir, tracked_run(cfg))
        for step in steps:
            metrics.log(step, loss=2.0)
        metrics.finish({"step": steps[-1]})
        assert (run_dir / LOSS_CURVE_FILE).is_file() == drawn, steps


def test_tensorboard_holds_the_runs_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ds_hydra.training.trainer import train

    train(compose([*TINY, "logger=tensorboard", "trainer.max_steps=2", "trainer.log_interval=1"]), run_dir=tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    jsonl = metric_rows([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()])
    for key in ("loss", "lr", "val_loss"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({step: row[key] for step, row in jsonl.items() if key in row}, rel=1e-6), key


# -- W&B and MLflow: every metric, read back ----------------------------------------------------------
@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The working directory is tmp_path: MLflow's default store lands in tmp_path/outputs/mlflow.db."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tracked_run(run_dir: Path, *extra: str):
    from ds_hydra.training.trainer import train

    return train(compose([*RUN, "logger=[jsonl,csv,wandb,mlflow]", "name=tracked", *extra]), run_dir=run_dir)


def test_wandb_and_mlflow_hold_every_metric(in_tmp):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    run_dir = in_tmp / "run"
    tracked_run(run_dir)
    records, final = jsonl(run_dir), final_metrics(run_dir)
    expected = metric_rows(records)
    assert sorted(expected) == [2, 3, 4, 6]  # loss at 2, 4, 6; evaluations at 3 and 6

    (wb,) = wandb_runs(run_dir)
    assert (wb["name"], wb["project"], wb["exit_code"]) == ("tracked", "ds_hydra", 0)
    assert metric_rows(wb["history"]) == expected  # every metric at its step
    assert wb["config"]["optimizer"]["lr"] == 0.001 and wb["config"]["trainer"]["max_steps"] == 6
    assert wb["summary"]["final/val_loss"] == final["val_loss"]
    assert wb["summary"]["loss_curve/_type"] == "image-file"

    client = mlflow_client(in_tmp / "outputs" / "mlflow.db")
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids["wandb"]["id"] == wb["id"] and ids["last_logged_step"] == 6
    ml = client.get_run(ids["mlflow"]["run_id"])
    assert (ml.info.run_name, ml.info.status) == ("tracked", "FINISHED")
    assert client.get_experiment(ml.info.experiment_id).name == "ds_hydra"
    assert mlflow_history(client, ml.info.run_id) == expected
    assert ml.data.params["optimizer.lr"] == "0.001" and ml.data.params["model.n_layer"] == "4"
    assert ml.data.metrics["final/val_loss"] == final["val_loss"]
    assert sorted(a.path for a in client.list_artifacts(ml.info.run_id)) == ["config_resolved.yaml", "loss_curve.png"]


@pytest.mark.slow
def test_resume_continues_the_same_tracker_runs(in_tmp):
    """From the step-4 checkpoint of a 6-step run to step 8: the same W&B and MLflow runs; steps 5 and 6,
    recomputed bit for bit, are not sent twice; the CSV file is rewritten from the kept records."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    run_dir = in_tmp / "run"
    tracked_run(run_dir)
    client = mlflow_client(in_tmp / "outputs" / "mlflow.db")
    ids = json.loads((run_dir / "trackers.json").read_text())
    before = mlflow_history(client, ids["mlflow"]["run_id"])

    tracked_run(run_dir, "trainer.max_steps=8", f"resume={run_dir / 'checkpoints' / 'step_0000004.pt'}")
    now = metric_rows(jsonl(run_dir))
    assert sorted(now) == [2, 3, 4, 6, 8]
    assert now[6]["loss"] == before[6]["loss"] and now[6]["val_loss"] == before[6]["val_loss"]  # an exact resume
    first, second = wandb_runs(run_dir)
    assert second["id"] == first["id"] == ids["wandb"]["id"]  # W&B continues the run when it syncs
    assert metric_rows(second["history"]) == {8: now[8]}
    assert json.loads((run_dir / "trackers.json").read_text()) == {**ids, "last_logged_step": 8}
    assert mlflow_history(client, ids["mlflow"]["run_id"]) == {**before, 8: now[8]}  # one value per step
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FINISHED"
    csv_steps = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == [r["step"] for r in jsonl(run_dir)]


# -- a tracker that fails costs a warning, never the run ----------------------------------------------
class FullDisk(Tracker):
    key = "csv"

    def __init__(self, cfg=None):
        self.logged = 0

    def log(self, step, record):
        self.logged += 1
        if self.logged == 2:
            raise OSError(28, "No space left on device")


def test_a_failing_tracker_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    from ds_hydra.tracking import session
    from ds_hydra.training.trainer import train

    monkeypatch.setattr(session, "_tracker_classes", lambda: {"csv": FullDisk})
    with caplog.at_level(logging.WARNING, logger="ds_hydra.tracking"):
        final = train(compose([*TINY, "logger=[jsonl,csv]"]), run_dir=tmp_path / "run")
    assert final["step"] == 6 and len(jsonl(tmp_path / "run")) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["logger=csv: log failed (OSError: [Errno 28] No space left on device); "
                        "the run goes on without it (metrics.jsonl has every record)"]


def test_an_unreachable_mlflow_server_costs_a_warning(tmp_path, caplog):
    pytest.importorskip("mlflow")
    from ds_hydra.training.trainer import train

    with caplog.at_level(logging.WARNING, logger="ds_hydra.tracking"):
        final = train(compose([*TINY, "logger=[jsonl,mlflow]", "logger.mlflow.tracking_uri=http://127.0.0.1:9"]),
                      run_dir=tmp_path / "run")
    assert final["step"] == 6 and len(jsonl(tmp_path / "run")) == 5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("ds_hydra")]
    assert warning.startswith("logger=mlflow: start failed (MlflowException: API request to http://127.0.0.1:9/")
    assert warning.endswith("the run goes on without it (metrics.jsonl has every record)")


# -- sweeps: jobs grouped (a W&B group, an MLflow parent run in an experiment of the sweep) -----------
@pytest.mark.slow
def test_sweep_jobs_are_grouped(hydra_sweep_runner, in_tmp):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from ds_hydra.cli import config_dir, run_task
    from ds_hydra.config_store import register_configs

    register_configs()
    sweep_dir = in_tmp / "sweep"
    runner = hydra_sweep_runner(
        calling_file=None, calling_module="ds_hydra.cli", task_function=run_task, config_path=config_dir(),
        config_name="config", temp_dir=sweep_dir,
        overrides=["hydra.mode=MULTIRUN", *TINY, "logger=[jsonl,wandb,mlflow]", "optimizer.lr=0.001,0.002"],
    )
    with runner:  # the sweep dir is removed when the block ends
        label = str(sweep_dir.relative_to(in_tmp))
        groups = [[r["group"] for r in wandb_runs(sweep_dir / str(n))] for n in (0, 1)]
        assert groups == [[label], [label]]

        client = mlflow_client(in_tmp / "outputs" / "mlflow.db")
        experiment = client.get_experiment_by_name(label)  # one experiment per sweep
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                          key=lambda r: r.info.run_name)
        shown = " ".join(o for o in TINY if o != "trainer.progress=false")  # launch plumbing is left out
        assert [r.info.run_name for r in children] == [f"job 0: {shown} optimizer.lr=0.001", f"job 1: {shown} optimizer.lr=0.002"]
        for n, child in enumerate(children):
            assert mlflow_history(client, child.info.run_id) == metric_rows(jsonl(sweep_dir / str(n)))
        assert parent.info.status == "FINISHED" and parent.info.run_name == f"sweep {label}"
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert artifacts == {"sweep_summary.md", "sweep_summary.csv", "sweep_summary.png"}


@pytest.mark.slow
def test_readme_command_leaves_an_offline_wandb_run_and_an_mlflow_run(tmp_path):
    """README's `python -m ds_hydra 'logger=[jsonl,wandb,mlflow]'`, through the CLI, from a fresh folder."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    proc = run_cli(["logger=[jsonl,wandb,mlflow]", *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("metrics.jsonl")]
    expected = metric_rows(jsonl(run_dir))
    (wb,) = wandb_runs(run_dir)
    assert metric_rows(wb["history"]) == expected
    client = mlflow_client(tmp_path / "outputs" / "mlflow.db")
    (ml,) = client.search_runs([client.get_experiment_by_name("ds_hydra").experiment_id])
    assert mlflow_history(client, ml.info.run_id) == expected and ml.info.status == "FINISHED"
    shown = " ".join(o for o in TINY if o != "trainer.progress=false")  # named by its overrides
    assert ml.info.run_name == shown and wb["name"] == shown[:128]  # W&B's limit on names
