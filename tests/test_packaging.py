"""The wheel carries the configs and the corpus: installed, ds_hydra runs from any folder."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = out.glob("ds_hydra-*.whl")
    return path


def test_wheel_contains_configs_corpus_and_plugin(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "ds_hydra/conf/__init__.py",
        "ds_hydra/conf/config.yaml",
        "ds_hydra/conf/model/gpt_small.yaml",
        "ds_hydra/conf/experiment/nanogpt_cpu.yaml",
        "ds_hydra/data/tinyshakespeare.txt.gz",
        "hydra_plugins/ds_hydra_searchpath/ds_hydra_searchpath.py",
        "hydra_plugins/ds_hydra_torchrun_launcher/config.py",
        "hydra_plugins/ds_hydra_torchrun_launcher/torchrun_launcher.py",
        "hydra_plugins/ds_hydra_torchrun_launcher/_core.py",
    ):
        assert required in names, required
    shipped = {n for n in names if n.startswith("ds_hydra/conf/") and n.endswith(".yaml")}
    in_repo = {"ds_hydra/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_repo, in_repo ^ shipped
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)


def test_installed_wheel_trains_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    args = ["model=gpt_tiny", "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.batch_size=2", "trainer.device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "ds_hydra", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p.parent for p in (workdir / "outputs").rglob("metrics.jsonl")]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import ds_hydra, ds_hydra.cli as c; print(ds_hydra.__file__); print(c.config_dir())"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
    )
    assert str(site) in probe.stdout and "pkg://ds_hydra.conf" in probe.stdout
