"""``python -m ds_hydra --help``: the user's groups with their options and the examples, not the schemas."""
from __future__ import annotations

from pathlib import Path

from conftest import REPO, run_cli

USER_GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))


def group_lines(text: str) -> dict:
    lines = text.split("Config groups")[1].split("\n\n")[0].splitlines()[1:]
    return {line.split(":")[0].split(" (")[0].strip(): line.split(": ")[-1] for line in lines}


def test_help_lists_the_users_groups_and_hides_the_schemas(tmp_path):
    proc = run_cli(["--help", "optimizer=sgd", "logger=[jsonl,mlflow]"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    groups = group_lines(proc.stdout)
    assert sorted(g for g in groups if g != "hydra/launcher") == USER_GROUPS  # every group of conf/, nothing else
    assert "schema" not in proc.stdout
    for group in USER_GROUPS:  # every option of every group, as the YAML files in conf/ name them
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert groups[group].replace("*", "").split(", ") == options
    assert "sgd*" in groups["optimizer"] and "adamw*" not in groups["optimizer"]  # this command's choices
    assert "jsonl*" in groups["logger"] and "mlflow*" in groups["logger"]
    assert "torchrun" in groups["hydra/launcher"].split(", ")
    for command in ("python -m ds_hydra 'logger=[jsonl,wandb,mlflow]'",
                    "python -m ds_hydra -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=2 optimizer.lr=1e-3,2e-3"):
        assert command in proc.stdout and command in Path(REPO / "README.md").read_text()
