"""A DeepSpeed config is checked against the world size the run will have: the torchrun launcher's
``nnodes x nproc_per_node`` when ds_hydra launches it (``hydra/launcher=torchrun``), WORLD_SIZE inside a
launcher's process. Commands that only print or check the config start no process group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

# Written for 8 GPUs: 512 = micro-batch 16 x accumulation 4 x 8 ranks.
EIGHT_RANKS = {
    "train_batch_size": 512,
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
    "zero_optimization": {"stage": 2},
}
# A launcher's environment whose rendezvous nobody answers: creating a process group would fail or hang.
NOBODY_LISTENS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}


def _config(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(EIGHT_RANKS))
    return path


def test_eight_rank_config_composes_under_the_torchrun_launcher(tmp_path):
    path = _config(tmp_path)
    proc = run_cli([f"deepspeed_config={path}", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=8",
                    "--cfg", "job", "--package", "trainer"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "batch_size: 16\n" in proc.stdout and "grad_accum_steps: 4\n" in proc.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()  # nothing ran

    two_nodes = run_cli([f"deepspeed_config={path}", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=4",
                         "hydra.launcher.nnodes=2", "--cfg", "job", "--package", "trainer"], cwd=tmp_path)
    assert two_nodes.returncode == 0, two_nodes.stderr
    assert "grad_accum_steps: 4\n" in two_nodes.stdout


def test_a_config_for_another_world_size_is_refused_naming_the_launcher_flag(tmp_path):
    path = _config(tmp_path)
    proc = run_cli([f"deepspeed_config={path}", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=4", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"ds_hydra: error: deepspeed_config={path}: train_batch_size=512 = train_micro_batch_size_per_gpu 16 x "
        f"gradient_accumulation_steps 4 x 8 ranks: written for world size 8, but this run has 4; launch it on 8 ranks "
        f"(hydra/launcher=torchrun hydra.launcher.nproc_per_node=8, or torchrun --nproc_per_node=8), or drop one of "
        f"the three to derive it for 4"
    ]


@pytest.mark.slow
def test_print_and_validate_under_torchrun_start_no_process_group(tmp_path):
    """Inside torchrun's environment rank 0 prints (for WORLD_SIZE 8) and the other ranks exit silently,
    with nobody listening at MASTER_PORT: no process group was attempted."""
    path = _config(tmp_path)
    args = [f"deepspeed_config={path}", "--cfg", "job", "--package", "trainer"]
    rank0 = run_cli(args, cwd=tmp_path, env={**NOBODY_LISTENS, "RANK": "0"}, timeout=120)
    assert rank0.returncode == 0, rank0.stderr
    assert "batch_size: 16\n" in rank0.stdout and "grad_accum_steps: 4\n" in rank0.stdout
    rank3 = run_cli(args, cwd=tmp_path, env={**NOBODY_LISTENS, "RANK": "3"}, timeout=120)
    assert (rank3.returncode, rank3.stdout, rank3.stderr) == (0, "", "")
    validate = run_cli(["task=validate", "model=gpt_tiny", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'v'}"], cwd=tmp_path,
                       env={**NOBODY_LISTENS, "RANK": "0", "WORLD_SIZE": "2"}, timeout=120)
    assert validate.returncode == 0, validate.stderr
    assert "task=validate: model=gpt_tiny" in validate.stdout


def test_import_task_checks_the_config_against_the_composed_launchers_world_size(tmp_path, monkeypatch):
    """``task=import_deepspeed`` mapping the file itself (a Python call, a sweep job: no command line mapped
    it) uses the launching rule too: the composed ``hydra/launcher=torchrun``'s nnodes x nproc_per_node
    where no launcher started this process, else the launch environment's WORLD_SIZE."""
    from hydra.core.hydra_config import HydraConfig

    from conftest import compose
    from ds_hydra.deepspeed.import_task import import_task
    from ds_hydra.errors import UserError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # set below; restored after the test
    path = _config(tmp_path)

    def imported(*launcher):
        cfg = compose(["task=import_deepspeed", f"deepspeed_config={path}", *launcher], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return import_task(cfg, run_dir=tmp_path / "run")

    result = imported("hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=4", "hydra.launcher.nnodes=2")
    assert {"trainer.batch_size=16", "trainer.grad_accum_steps=4"} <= set(result["overrides"])
    assert "(world size 8)" in Path(result["experiment"]).read_text().splitlines()[1]

    with pytest.raises(UserError, match="written for world size 8, but this run has 1"):
        imported()  # the basic launcher: one process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a launcher's process its world size wins
    with pytest.raises(UserError, match="written for world size 8, but this run has 2"):
        imported("hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=8")
