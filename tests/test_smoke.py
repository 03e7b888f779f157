from conftest import compose, run_cli, tiny_run_args


def test_default_config_composes():
    cfg = compose()
    assert cfg.model.n_layer == 4 and cfg.trainer.max_steps == 2000
    assert cfg.scheduler.warmup_steps == 100  # 5% of 2000, nanoGPT's warmup


def test_tiny_run_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_run_args(run_dir))
    assert proc.returncode == 0, proc.stderr
    for name in ("config_resolved.yaml", "metrics.jsonl", "loss_curve.png", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("step_*.pt"))
