"""The SearchPathPlugin: ds_hydra's groups under ``ds_hydra/`` in other Hydra apps, found after a real install."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.object_type import ObjectType

from conftest import REPO

FOREIGN_APP = REPO / "tests" / "foreign_app" / "app.py"


def plugin_module():
    from hydra_plugins.ds_hydra_searchpath import ds_hydra_searchpath

    return ds_hydra_searchpath


# -- the plugin directly ---------------------------------------------------------------------------
def test_config_source_prefixes_public_groups_and_hides_private_ones():
    m = plugin_module()
    source = m.DSHydraConfigSource(provider="ds_hydra", path=m.SEARCH_PATH)
    assert source.available()
    assert source.list("", ObjectType.GROUP) == ["ds_hydra"] and source.list("", ObjectType.CONFIG) == []
    groups = source.list("ds_hydra", ObjectType.GROUP)
    assert {"model", "optimizer", "scheduler", "ckpt", "trainer", "data"} <= set(groups)
    assert not set(groups) & {"experiment", "hparams_search", "hydra"}
    assert "adamw" in source.list("ds_hydra/optimizer", ObjectType.CONFIG)
    assert source.is_config("ds_hydra/optimizer/adamw") and not source.is_config("optimizer/adamw")
    assert not source.is_config("ds_hydra/config") and not source.is_group("ds_hydra/experiment")
    # model YAMLs have no defaults line (ds_hydra's root schema types them); here they get their schema
    model = source.load_config("ds_hydra/model/gpt_tiny").config
    assert list(model.defaults) == ["/schema/model/gpt@_here_", "_self_"] and model.n_embd == 32
    optimizer = source.load_config("ds_hydra/optimizer/adamw").config
    assert optimizer.defaults[0] == "/schema/optimizer/optimizer@_here_"  # its own line, unchanged


def test_plugin_appends_for_other_apps_and_skips_ds_hydra_itself():
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    from ds_hydra.cli import config_dir

    m = plugin_module()
    other = ConfigSearchPathImpl()
    other.append("main", "file:///some/app/conf")
    m.DSHydraSearchPathPlugin().manipulate_search_path(other)
    assert [(e.provider, e.path) for e in other.get_path()][-1] == ("ds_hydra", "ds_hydra://ds_hydra.conf")

    own = ConfigSearchPathImpl()
    own.append("main", config_dir())
    m.DSHydraSearchPathPlugin().manipulate_search_path(own)
    assert [e.provider for e in own.get_path()] == ["main"]


def test_plugin_discovery_imports_no_torch():
    code = (
        "import sys; from hydra.core.plugins import Plugins; from hydra.plugins.search_path_plugin import SearchPathPlugin;"
        "from hydra.plugins.launcher import Launcher;"
        "names = [p.__name__ for p in Plugins.instance().discover(SearchPathPlugin)];"
        "assert 'DSHydraSearchPathPlugin' in names, names;"
        "launchers = [p.__name__ for p in Plugins.instance().discover(Launcher)];"
        "assert 'TorchrunLauncher' in launchers, launchers; assert 'torch' not in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- a separate Hydra app against a real install ---------------------------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """ds_hydra built as a wheel and installed into a fresh folder (a default editable install would not
    expose hydra_plugins/: Hydra issue 2359)."""
    root = tmp_path_factory.mktemp("plugin_install")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "wheel")],
        check=True, capture_output=True, timeout=600,
    )
    (wheel,) = (root / "wheel").glob("ds_hydra-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel)],
        check=True, capture_output=True, timeout=600,
    )
    return root


def run_foreign_app(installed: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = str(installed / "site")  # ds_hydra and its plugin only from the install
    workdir = installed / "cwd"
    workdir.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(FOREIGN_APP), "hydra.run.dir=.", "hydra.output_subdir=null", *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )


def test_installed_plugin_is_on_the_foreign_apps_search_path(installed):
    proc = run_foreign_app(installed, "--info", "searchpath")
    assert proc.returncode == 0, proc.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines() if line.startswith("|")]
    assert ["ds_hydra", "ds_hydra://ds_hydra.conf"] in rows
    assert rows.index(["ds_hydra", "ds_hydra://ds_hydra.conf"]) > [r[0] for r in rows].index("main")  # appended


def test_foreign_app_composes_ds_hydra_groups_with_their_schemas(installed):
    proc = run_foreign_app(installed, "ds_hydra/optimizer@optimizer=sgd", "optimizer.momentum=0.5")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cfg["schemas"] == {"model": "GPTConfig", "optimizer": "OptimizerConfig", "scheduler": "CosineSchedulerConfig",
                              "trainer": "TrainerConfig"}
    assert cfg["optimizer"]["_target_"] == "torch.optim.SGD" and cfg["optimizer"]["momentum"] == 0.5
    # the resolver came along: 5% warmup of the app's trainer.max_steps=300
    assert (cfg["scheduler"]["warmup_steps"], cfg["scheduler"]["total_steps"]) == (15, 300)
    assert cfg["model"]["n_embd"] == 32 and cfg["app_setting"] == 7

    typo = run_foreign_app(installed, "model.n_layr=2")
    assert typo.returncode != 0 and "Key 'n_layr' not in 'GPTConfig'" in typo.stderr
    wrong_type = run_foreign_app(installed, "optimizer.lr=fast")
    assert wrong_type.returncode != 0 and "optimizer.lr" in wrong_type.stderr


def test_installed_torchrun_launcher_is_discovered(installed):
    """After a real install, any Hydra app finds hydra/launcher=torchrun (the plugin registers its config)."""
    plugins = run_foreign_app(installed, "--info", "plugins")
    assert plugins.returncode == 0, plugins.stderr
    launchers = plugins.stdout.split("Launcher:")[1].split("Sweeper:")[0].split()
    assert "TorchrunLauncher" in launchers
    config = run_foreign_app(installed, "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", "--cfg", "hydra", "-p", "hydra.launcher")
    assert config.returncode == 0, config.stderr
    assert "nproc_per_node: '2'" in config.stdout and "TorchrunLauncher" in config.stdout
