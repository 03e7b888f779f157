"""The real command line: a short run end to end (its refusals of bad input: test_bad_input.py)."""
from __future__ import annotations

import json
import subprocess
import sys


from conftest import REPO, run_cli, tiny_run_args


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_run_learns_and_writes_everything(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_run_args(run_dir, "trainer.max_steps=40", "trainer.eval_interval=20", "trainer.log_interval=10"))
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(run_dir)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses  # from ln(65) ~ 4.17 downwards
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    # the terminal gets a few lines: what runs and where it writes; the run's log gets the whole config
    assert f"task=train: model=gpt_tiny data=shakespeare_char loss=cross_entropy optimizer=adamw scheduler=cosine ckpt=none engine=auto\n" in proc.stdout
    assert f"run dir: {run_dir} (the whole resolved config: {run_dir / 'ds_hydra.log'})" in proc.stdout
    assert "task=train; resolved config:" not in proc.stdout and "max_steps: 40" not in proc.stdout
    log_text = (run_dir / "ds_hydra.log").read_text()
    assert "task=train; resolved config:" in log_text and "max_steps: 40" in log_text  # logged at start
    progress = [line for line in (proc.stdout + proc.stderr).splitlines() if "step 20/40:" in line]
    assert progress and "tokens_per_s" not in progress[0] and "tok_s" in progress[0] and " eta 0m" in progress[0]
    resolved = (run_dir / "config_resolved.yaml").read_text()
    assert "${" not in resolved and "n_layer: 4" in resolved
    assert "max_steps: 40" in (run_dir / ".hydra" / "config.yaml").read_text()  # Hydra's own record of the run
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load

    state = safe_torch_load(latest_checkpoint(run_dir))
    assert state["step"] == 40 and set(state) >= {"model", "optimizer", "scheduler", "rng", "data", "config"}


def test_readme_command_with_segments(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["optimizer=adam", "ckpt.segments=4", "trainer.max_steps=3", "model=gpt_tiny", f"hydra.run.dir={run_dir}",
                    "trainer.eval_batches=2", "trainer.device=cpu", "trainer.progress=false"])
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "metrics.jsonl").is_file()
    out = proc.stdout + proc.stderr  # the plan and what it saved, in the log
    assert "activation checkpointing: blocks (4 x Block): 3/4 blocks recomputed" in out and "activation memory:" in out


# Bad input, one clear line each: test_bad_input.py.


def test_printing_the_config_does_not_import_torch():
    code = (
        "import sys; from ds_hydra.cli import cli_main; sys.argv = ['ds-hydra', '--cfg', 'job'];\n"
        "try:\n    cli_main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "n_layer: 4" in proc.stdout
