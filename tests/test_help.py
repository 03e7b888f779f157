"""``python -m ds_hydra --help``: the user's groups with their options and the examples, not the schemas."""
from __future__ import annotations

from pathlib import Path

from conftest import REPO, cli_in_process, run_cli

USER_GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))


def group_lines(text: str) -> dict:
    lines = [line for line in text.split("Config groups")[1].split("\n\n")[0].splitlines()[1:] if not line.startswith("    ")]
    return {line.split(":")[0].split(" (")[0].strip(): line.split(": ")[-1] for line in lines}


def test_help_lists_the_users_groups_and_hides_the_schemas(tmp_path):
    proc = run_cli(["--help", "optimizer=sgd", "logger=[jsonl,mlflow]", "task=validate"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from ds_hydra.cli import TASKS

    tasks = next(line for line in proc.stdout.splitlines() if line.startswith("Tasks (task=name"))
    assert sorted(tasks.split(": ", 1)[1].split(", ")) == sorted(t + "*" if t == "validate" else t for t in TASKS)
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


def test_help_names_the_launchers_this_install_lacks_and_how_to_get_them(tmp_path):
    """Without PYTHONPATH on the checkout (a default editable install, as here with a bare environment),
    Hydra cannot discover ds_hydra's torchrun launcher: the page says where it comes from."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "ds_hydra", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    launchers = group_lines(proc.stdout)["hydra/launcher"].replace("*", "").split(", ")
    assert "basic" in launchers
    absent = proc.stdout.split("Config groups")[1].split("  hydra/launcher")[1].split("\n\n")[0]
    for name, how in (("torchrun", "editable_mode=strict"), ("joblib", "pip install 'ds-hydra[sweeps]'")):
        assert (name in launchers) != (f"{name} (" in absent and how in absent), (name, proc.stdout)


def test_a_bad_override_on_the_help_page_is_one_line(tmp_path):
    proc = cli_in_process(["--help", "optimizer=sgdd"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ds_hydra: error: optimizer=sgdd: no such config option (did you mean 'sgd'?); available: "
        + ", ".join(sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml")))]
