"""Multiruns: job count and overrides, the sweep report (failures included), launcher and sweeper plugins."""
from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import ds_hydra.cli as cli
from conftest import REPO, TINY, compose, run_cli
from ds_hydra.cli import config_dir, run_task
from ds_hydra.config_store import register_configs
from ds_hydra.errors import UserError
from ds_hydra.common.startup import StartUp
from ds_hydra.sweeps import SUMMARY_FILES, Objective, select_objective


# -- a stand-in for training: metrics are a known function of the config -----------------------------
def fake_metrics(cfg) -> dict:
    lr, segments = cfg.optimizer.lr, cfg.ckpt.segments
    if lr < 0.0005:
        raise RuntimeError(f"planted failure at lr={lr}")
    val = (math.log10(lr) + 3.0) ** 2 + 0.1 * cfg.optimizer.weight_decay + 0.01 * segments + 2.0
    if cfg.optimizer._target_.endswith("SGD"):
        val += 0.001
    return {
        "step": cfg.trainer.max_steps,
        "train_loss": val - 0.01,
        "val_loss": val,
        "tokens_per_s": 1000.0 * (1 + segments),
        "activation_bytes": 4096 // (1 + segments),
        "wall_s": 0.01,
        "run_dir": "unused",
    }


def fake_train(cfg) -> dict:
    return fake_metrics(cfg)


def run_task_with_fake_train(cfg):
    """The real task function with task=train routed to ``fake_train`` (in launcher processes too)."""
    cli.TASKS["train"] = f"{__name__}:fake_train"
    return run_task(cfg)


@pytest.fixture
def sweep(hydra_sweep_runner, tmp_path):
    register_configs()
    yield lambda overrides, task=run_task_with_fake_train: hydra_sweep_runner(
        calling_file=None,
        calling_module="ds_hydra.cli",
        task_function=task,
        config_path=config_dir(),
        config_name="config",
        overrides=["hydra.mode=MULTIRUN", *TINY, *overrides],  # `-m` sets the mode on the command line
        temp_dir=tmp_path / "sweep",
    )


@pytest.fixture(autouse=True)
def restore_tasks(monkeypatch):
    monkeypatch.setitem(cli.TASKS, "train", cli.TASKS["train"])


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_one_job_per_combination_and_reports_each(sweep, tmp_path):
    with sweep(["optimizer=adam,sgd", "optimizer.lr=0.001,0.01", "ckpt.segments=2,4"]) as run:
        jobs = [job for batch in run.returns for job in batch]
        assert len(jobs) == 8
        swept = [tuple(o for o in job.overrides if o.split("=")[0] in ("optimizer", "optimizer.lr", "ckpt.segments")) for job in jobs]
        assert sorted(swept) == sorted(
            (f"optimizer={opt}", f"optimizer.lr={lr}", f"ckpt.segments={seg}")
            for opt in ("adam", "sgd") for lr in ("0.001", "0.01") for seg in ("2", "4")
        )
        for job in jobs:  # each job saw its own overrides in its config and returned its metrics
            assert job.return_value == fake_metrics(job.cfg)
            assert f"optimizer.lr={job.cfg.optimizer.lr}" in job.overrides

        sweep_dir = tmp_path / "sweep"
        for name in SUMMARY_FILES:
            assert (sweep_dir / name).is_file(), name
        rows = read_csv(sweep_dir / "sweep_summary.csv")
        assert [int(r["job"]) for r in rows] == list(range(8))
        by_job = {job.hydra_cfg.hydra.job.num: job for job in jobs}
        for row in rows:
            metrics = fake_metrics(by_job[int(row["job"])].cfg)
            assert float(row["val_loss"]) == pytest.approx(metrics["val_loss"])
            assert int(row["activation_bytes"]) == metrics["activation_bytes"]
            assert row["status"] == "completed" and not row["error"]
            assert "model=gpt_tiny" not in row["overrides"]  # shared overrides are shown once, above the table
        # the lowest val loss: adam (no SGD penalty), lr=0.001 (log10 lr = -3), two segments
        best = [r for r in rows if r["best"] == "True"]
        assert [r["overrides"] for r in best] == ["optimizer=adam optimizer.lr=0.001 ckpt.segments=2"]
        assert float(best[0]["val_loss"]) == min(float(r["val_loss"]) for r in rows) == pytest.approx(2.02)
        markdown = (sweep_dir / "sweep_summary.md").read_text()
        assert markdown.count("\n| ") == 1 + 8  # header + one row per job
        assert "(best)" in markdown and "Every job: `model=gpt_tiny" in markdown


def test_failed_jobs_are_reported_even_though_the_sweeper_raises(sweep, tmp_path):
    """Hydra's basic sweeper re-raises the first failure after the batch and skips on_multirun_end."""
    with StartUp.opened() as startup:  # as cli_main opens it
        with pytest.raises(RuntimeError, match="planted failure"):
            with sweep(["optimizer.lr=0.0001,0.001,0.0002"]):
                pass
    assert not (tmp_path / "sweep" / "sweep_summary.csv").exists()  # the callback could not write it
    outcome = startup.sweep.finish()  # what the CLI does when the sweep raised
    assert (outcome.jobs, outcome.failed) == (3, 2)
    assert "RuntimeError: planted failure at lr=0.0001" in outcome.first_error
    rows = read_csv(tmp_path / "sweep" / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["failed", "completed", "failed"]
    assert rows[2]["error"] == "RuntimeError: planted failure at lr=0.0002"
    assert rows[1]["best"] == "True"
    assert (tmp_path / "sweep" / "sweep_summary.png").is_file()


def test_objective_makes_the_task_return_one_number():
    cfg = compose(["objective=val_loss"])
    objective = select_objective(cfg, {"val_loss": 1.5, "train_loss": 1.4})
    assert objective == 1.5 and isinstance(objective, float)
    # the number carries every metric to the sweep report, also back from a launcher's worker process
    assert pickle.loads(pickle.dumps(objective)).metrics == {"val_loss": 1.5, "train_loss": 1.4}
    assert isinstance(objective, Objective)
    assert select_objective(compose([]), {"val_loss": 1.5}) == {"val_loss": 1.5}
    with pytest.raises(UserError, match="objective=val_los: the task returned no such metric; available: train_loss, val_loss"):
        select_objective(compose(["objective=val_los"]), {"val_loss": 1.5, "train_loss": 1.4, "run_dir": "x"})


def test_multirun_cli_writes_the_three_summary_files(tmp_path):
    """The real CLI and trainer: 4 jobs, 2 of which fail validation; the report lists all 4, exit 1."""
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(
        ["-m", *TINY, "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.log_interval=1",
         "optimizer.lr=0.001,-1", "ckpt.segments=0,2", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "ds_hydra: error: 2 of 4 sweep jobs failed (first: ConfigError: optimizer.lr=-1.0: must be > 0)" in proc.stderr
    for name in SUMMARY_FILES:
        assert (sweep_dir / name).stat().st_size > 0, name
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert [(r["overrides"], r["status"]) for r in rows] == [
        ("optimizer.lr=0.001 ckpt.segments=0", "completed"),
        ("optimizer.lr=0.001 ckpt.segments=2", "completed"),
        ("optimizer.lr=-1 ckpt.segments=0", "failed"),
        ("optimizer.lr=-1 ckpt.segments=2", "failed"),
    ]
    # activation checkpointing recomputes the same forward: the losses of jobs 0 and 1 agree
    assert float(rows[0]["val_loss"]) == pytest.approx(float(rows[1]["val_loss"]), rel=1e-5)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows[:2])
    assert (sweep_dir / "0" / "metrics.jsonl").is_file()
    assert (sweep_dir / "sweep_summary.md").read_text().count("\n| ") == 1 + 4


# -- launcher and sweeper plugins (optional extras: tested when installed) ---------------------------
def test_launcher_presets_extend_submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    path = config_dir()
    ctx = (initialize_config_module(path[len("pkg://"):], version_base=None) if path.startswith("pkg://")
           else initialize_config_dir(path, version_base=None))
    with ctx:
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    assert launcher.submitit_folder.startswith("outputs/multirun/") and launcher.submitit_folder.endswith("/.submitit/%j")


def test_joblib_launcher_runs_jobs_in_worker_processes(sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    overrides = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.weight_decay=0", "optimizer.lr=0.001,0.01,0.1"]
    with sweep(overrides) as run:
        jobs = [job for batch in run.returns for job in batch]
        assert [job.return_value["val_loss"] for job in jobs] == pytest.approx([2.0, 3.0, 6.0])
        rows = read_csv(tmp_path / "sweep" / "sweep_summary.csv")  # records written by the workers
        assert [float(r["val_loss"]) for r in rows] == pytest.approx([2.0, 3.0, 6.0])


def test_optuna_sweeper_minimizes_the_objective(sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with sweep(["hparams_search=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=0",
                "optimizer.lr=tag(log, interval(0.001, 0.1))"]):
        sweep_dir = tmp_path / "sweep"
        result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
        rows = read_csv(sweep_dir / "sweep_summary.csv")
        assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
        # Optuna got one float per trial (objective=val_loss) and the report still has every metric
        assert result.best_value == pytest.approx(min(float(r["val_loss"]) for r in rows))
        assert all(r["tokens_per_s"] and r["train_loss"] for r in rows)
        best = next(r for r in rows if r["best"] == "True")
        assert f"optimizer.lr={result.best_params['optimizer.lr']}" in best["overrides"]


@pytest.mark.slow
def test_joblib_and_optuna_through_the_cli(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    proc = run_cli(["-m", *TINY, "trainer.max_steps=3", "trainer.eval_batches=1", "hparams_search=optuna",
                    "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert len(rows) == 4
    assert result.best_value == pytest.approx(min(float(r["val_loss"]) for r in rows))


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "submitit"
    proc = run_cli(["-m", *TINY, "trainer.max_steps=2", "trainer.eval_batches=1", "hydra/launcher=submitit_local",
                    "hydra.launcher.timeout_min=5", "optimizer=adam,sgd", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert [(r["overrides"], r["status"]) for r in rows] == [("optimizer=adam", "completed"), ("optimizer=sgd", "completed")]
    assert list((sweep_dir / ".submitit").rglob("*_log.out"))


@pytest.mark.slow
def test_every_experiment_preset_trains_two_steps(tmp_path):
    sweep_dir = tmp_path / "experiments"
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert presets  # a wrong folder would make the comparison below vacuous
    # each preset as it is, but 2 steps of 2 short sequences: a smoke test of the preset, not its cost
    proc = run_cli(["-m", "experiment=glob(*)", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.eval_batches=1",
                    "trainer.grad_accum_steps=1", "model.block_size=64",
                    "trainer.eval_interval=0", "trainer.device=cpu", "trainer.compile=false", "trainer.precision=fp32",
                    "trainer.progress=false", "scheduler.warmup_steps=0", "scheduler.total_steps=2",
                    f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert sorted(r["overrides"].split("experiment=")[1].split()[0] for r in rows) == presets
    assert all(r["status"] == "completed" and math.isfinite(float(r["val_loss"])) for r in rows)
