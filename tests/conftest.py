"""Shared test helpers: compose the real shipped configs, run the real CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent

# Overrides that make any run take a second or two on a CPU.
TINY = [
    "model=gpt_tiny",
    "trainer.max_steps=6",
    "trainer.batch_size=4",
    "trainer.eval_interval=3",
    "trainer.eval_batches=2",
    "trainer.log_interval=2",
    "trainer.device=cpu",
    "trainer.progress=false",
]

# Runs compared across engines (one process, DDP, FSDP, DeepSpeed): a few steps, no compile, evaluated
# only at the end (over 2 batches: one per rank with two ranks), and every step's gradient clipped.
ENGINE_STEPS = 4
ENGINE_RUN = [
    "model=gpt_tiny",
    f"trainer.max_steps={ENGINE_STEPS}",
    "trainer.batch_size=4",
    "trainer.eval_interval=0",
    "trainer.eval_batches=2",
    "trainer.log_interval=1",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.compile=false",
    "trainer.grad_clip=0.5",  # every step's global gradient norm (0.8 to 1.2) is clipped
]


def compose(overrides: Sequence[str] = (), config_name: str = "config", return_hydra_config: bool = False):
    """Compose the shipped config (as ``python -m ds_hydra`` would) without running anything; with
    ``return_hydra_config`` the ``hydra`` node comes too (``${now:}`` and ``hydra.run.dir`` resolvable)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ds_hydra.cli import config_dir
    from ds_hydra.config_store import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    path = config_dir()
    if path.startswith("pkg://"):
        from hydra import initialize_config_module

        ctx = initialize_config_module(config_module=path[len("pkg://"):], version_base=None)
    else:
        ctx = initialize_config_dir(config_dir=path, version_base=None)
    with ctx:
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def run_cli(args: Sequence[str], cwd: Path = None, env: dict = None, timeout: float = 300, input: str = None) -> subprocess.CompletedProcess:
    """``python -m ds_hydra ARGS`` in a subprocess; returns the completed process (text output). ``input``: text
    fed to its stdin through a pipe."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "ds_hydra", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def cli_in_process(args: Sequence[str], cwd: Path = None, env: dict = None) -> subprocess.CompletedProcess:
    """``python -m ds_hydra ARGS`` run here, in this process (``cli_main``, the code the command runs, without
    an interpreter to start and torch to import each time): what the tests of a refusal's message use. Its
    exit code, stdout and stderr come back as ``run_cli``'s do; the process is left as it was (argv, the
    working directory, ``env``'s variables and HYDRA_FULL_ERROR, the root logger's handlers, Hydra's
    singletons). One subprocess test per kind of refusal keeps the real process's exit code honest."""
    import contextlib
    import io
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ds_hydra.cli import cli_main

    saved_env = {name: os.environ.get(name) for name in ["HYDRA_FULL_ERROR", *(env or {})]}
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env or {})
    root = logging.getLogger()
    handlers, level, argv, here = list(root.handlers), root.level, sys.argv, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.chdir(cwd or REPO)
    sys.argv = ["ds_hydra", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(["ds_hydra", *args], code, out.getvalue(), err.getvalue())


def tiny_run_args(run_dir: Path, *extra: str) -> List[str]:
    return [*TINY, f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture
def tiny_overrides() -> List[str]:
    return list(TINY)


# -- CI: the tests that skipped ----------------------------------------------------------------------------
# .ci/run runs README's test command in a venv without the optional extras, then installs them and runs
# again exactly what skipped (a test, or a whole module that skipped at import): DS_HYDRA_SKIPPED_TESTS
# names the file that collects their node ids.
def _note_skipped(nodeid: str) -> None:
    path = os.environ.get("DS_HYDRA_SKIPPED_TESTS")
    if path and nodeid:
        with open(path, "a", encoding="utf-8") as f:
            f.write(nodeid + "\n")


def pytest_runtest_logreport(report):
    if report.skipped:
        _note_skipped(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:
        _note_skipped(report.nodeid)


# A launcher's variables: in-process runs may set some (DeepSpeed's engine insists on LOCAL_RANK, a
# --local-rank flag is turned into it), and a later test's library would read them as a distributed
# launch (accelerate, inside the harness's own hf model, then waits for a RANK).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def launcher_variables_stay_as_they_were():
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: tiny models gain nothing from more, and on a busy machine extra
    threads stall each op. Put back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
