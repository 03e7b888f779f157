"""One start-up path: a command line run validates, locks, checks memory, plans its start and checks the
checkpoint it continues once each (the CLI's callback settles them; the task uses what it settled), and
``train(cfg)`` called as a library does the same checks itself, once each."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY, compose, tiny_run_args

# Each guard, as "module:function"; counted wherever it is called from.
GUARDS = {
    "validate_config": "ds_hydra.validation:validate_config",
    "lock": "ds_hydra.common.run_lock:acquire",
    "memory check": "ds_hydra.training.memory_preflight:check_step_memory",
    "memory estimate": "ds_hydra.training.memory_estimate:estimate_step_memory",
    "plan_start": "ds_hydra.training.resume:plan_start",
    "check_compatible": "ds_hydra.training.resume:check_compatible",
}

# Replaces each guard by a counting wrapper before anything imports it, runs `body`, prints the counts.
COUNTING = """
import collections, importlib, json, sys
counts = collections.Counter()
def count(name, target):
    module, _, function = target.partition(":")
    mod = importlib.import_module(module)
    real = getattr(mod, function)
    def counted(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)
    setattr(mod, function, counted)
for name, target in {guards!r}.items():
    count(name, target)
try:
{body}
finally:
    print("COUNTS " + json.dumps(counts), flush=True)
"""


def counted_run(body: str) -> dict:
    code = COUNTING.format(guards=GUARDS, body="\n".join("    " + line for line in body.splitlines()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COUNTS ")]
    assert lines, proc.stderr[-3000:]
    return {"returncode": proc.returncode, "stderr": proc.stderr, **json.loads(lines[-1][len("COUNTS "):])}


def cli(args) -> str:
    return f"sys.argv = ['ds_hydra', *{list(args)!r}]\nfrom ds_hydra.cli import main\nmain()"


def test_a_command_line_run_checks_everything_once(tmp_path):
    run_dir = tmp_path / "run"
    first = counted_run(cli(tiny_run_args(run_dir, "trainer.max_steps=2")))
    assert first["returncode"] == 0, first["stderr"][-2000:]
    assert {k: first.get(k, 0) for k in GUARDS} == {
        "validate_config": 1, "lock": 1, "memory check": 1, "memory estimate": 1, "plan_start": 1, "check_compatible": 0}
    # continuing it: the checkpoint is checked against the config once too
    again = counted_run(cli([*TINY, f"resume={run_dir}", "trainer.max_steps=4"]))
    assert again["returncode"] == 0, again["stderr"][-2000:]
    assert {k: again.get(k, 0) for k in GUARDS} == {
        "validate_config": 1, "lock": 1, "memory check": 1, "memory estimate": 1, "plan_start": 1, "check_compatible": 1}


def test_train_as_a_library_checks_everything_once(tmp_path):
    body = (
        "sys.path.insert(0, 'tests')\nfrom conftest import compose\nfrom ds_hydra import train\n"
        f"train(compose({[*TINY, 'trainer.max_steps=2']!r}), run_dir={str(tmp_path / 'run')!r})"
    )
    counts = counted_run(body)
    assert counts["returncode"] == 0, counts["stderr"][-2000:]
    # compose() validates nothing: a library caller validates with ds_hydra.validation when it wants to
    assert {k: counts.get(k, 0) for k in GUARDS if k != "validate_config"} == {
        "lock": 1, "memory check": 1, "memory estimate": 1, "plan_start": 1, "check_compatible": 0}


# What a run could leave behind in its process for the next, planted by hand (before the first run, or
# between the two); the test below must catch each.
PLANTED_LEAKS = {
    # the stop request of the first run's signal, still set when the second starts
    "stop request": ("between", lambda monkeypatch: monkeypatch.setattr(
        "ds_hydra.common.signals._state.signum", __import__("signal").SIGUSR1)),
    # the data memo knowing a file by its name only: the second run would get the first's data
    "data": ("before", lambda monkeypatch: monkeypatch.setattr("ds_hydra.data.memo._version", lambda path: (str(path),))),
}


@pytest.mark.parametrize("leak", [None, *(pytest.param(k, marks=pytest.mark.slow) for k in PLANTED_LEAKS)])
def test_a_second_train_in_the_process_sees_nothing_of_the_first(tmp_path, monkeypatch, one_thread, leak):
    """Two ``ds_hydra.train(cfg)`` calls in one process. The first is pre-empted (SIGUSR1) before it starts,
    on a text file of 9 characters; the second, with the same config on the file edited to 12 characters,
    trains to its end on its own data, and each run left its directory unlocked. ``leak`` plants what the
    first would leave behind if process state leaked, and the same checks then see it."""
    import signal

    from ds_hydra import train
    from ds_hydra.common import signals

    when, plant = PLANTED_LEAKS.get(leak, (None, None))
    if when == "before":
        plant(monkeypatch)
    text = tmp_path / "corpus.txt"
    text.write_text("abcdefgh\n" * 2000)
    overrides = [*TINY, f"data.path={text}", "trainer.max_steps=2", "trainer.eval_interval=0"]
    with signals.stop_on_signals():
        os.kill(os.getpid(), signal.SIGUSR1)  # a pre-emption notice: the run saves nothing and stops
        with pytest.raises(signals.Stopped):
            train(compose(overrides), run_dir=tmp_path / "first")
    assert not (tmp_path / "first" / "run.lock").exists()
    text.write_text("ijklmnopqrs\n" * 2000)
    os.utime(text, ns=(0, 0))  # another content at another time: the data are built again
    if when == "between":
        plant(monkeypatch)
    seen = []
    try:
        metrics = train(compose(overrides), run_dir=tmp_path / "second")
    except signals.Stopped:
        seen.append("stop request")
    else:
        assert metrics["step"] == 2 and not (tmp_path / "second" / "run.lock").exists()
        vocab = json.loads((tmp_path / "second" / "tokenizer" / "tokenizer_meta.json").read_text())["vocab_size"]
        if vocab != 12:
            seen.append("data")
    assert seen == ([] if leak is None else [leak])


def test_a_command_leaves_the_process_as_it_found_it(tmp_path, monkeypatch, capsys):
    """cli_main sets HYDRA_FULL_ERROR for Hydra while it runs; a second command in the process (a wrapper,
    a notebook, the in-process CLI tests) must not take that for the user's wish and print tracebacks."""
    from ds_hydra.cli import cli_main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", ["ds_hydra", f"resume={tmp_path / 'nope'}"])
        with pytest.raises(SystemExit) as exit:
            cli_main()
        assert exit.value.code == 2 and "HYDRA_FULL_ERROR" not in os.environ
        assert capsys.readouterr().err == (f"ds_hydra: error: resume={tmp_path / 'nope'}: no such run directory; give the "
                                           "directory of an earlier run, e.g. outputs/2024-05-01/12-00-00\n")


@pytest.mark.parametrize("extra", [
    [],  # hydra.mode unset: Hydra adds hydra.mode=RUN to the run's overrides
    ["hydra.mode=RUN", "optimizer=sgd", "name=x"],  # the mode given; another group option; a value
    ["-m", "trainer.max_steps=1,2"],  # a multirun composes its own (the master, then each job)
])
def test_a_run_composes_its_config_once_and_gets_hydras_own(tmp_path, monkeypatch, extra):
    """Hydra composes a single run's config twice (``get_mode``, then ``run``); the CLI composes it once
    (``ds_hydra.cli.compose_once``), and the config the task gets, its ``hydra`` node included, is the
    one Hydra composes without that."""
    import shutil

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import ds_hydra.cli
    import ds_hydra.cli.compose_once
    from conftest import cli_in_process

    real = ConfigLoaderImpl.load_configuration
    compositions, seen = [], []

    def counted(self, *args, **kwargs):
        compositions.append(kwargs.get("run_mode"))
        return real(self, *args, **kwargs)

    def task(cfg):  # what the task gets: its config, and the hydra node HydraConfig holds for it
        seen.append(OmegaConf.to_yaml(cfg) + OmegaConf.to_yaml(HydraConfig.get()))

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    monkeypatch.setattr(ds_hydra.cli, "run_task", task)
    flags = [a for a in extra if a.startswith("-")]
    args = [*flags, *TINY, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *(a for a in extra if a not in flags)]
    found = {}
    for once in (True, False):
        if not once:
            monkeypatch.setattr(ds_hydra.cli.compose_once, "composing_once", __import__("contextlib").nullcontext)
        compositions.clear(), seen.clear()
        for folder in ("run", "sweep"):
            shutil.rmtree(tmp_path / folder, ignore_errors=True)
        proc = cli_in_process(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        found[once] = (len(compositions), list(seen))
    jobs = 2 if "-m" in extra else 1
    assert len(found[True][1]) == jobs and found[True][1] == found[False][1]
    if "-m" in extra:  # a multirun composes as Hydra does
        assert found[True][0] == found[False][0]
    else:  # Hydra composes get_mode's config and the run's
        assert (found[True][0], found[False][0]) == (1, 2)


def test_the_checks_hold_back_full_collections_and_give_the_collector_back():
    """``Preflight`` runs the checks (torch's import, the estimate's trace) without full garbage collections:
    the same long-lived allocations collect fully outside, never inside; the thresholds come back, after an
    error too."""
    import gc

    from ds_hydra.cli.preflight import full_collections_held_back

    full = []

    def seen(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    def allocate():  # long-lived objects, as an import makes them: enough to grow the old generation by half
        return [[] for _ in range(max(200_000, len(gc.get_objects()) // 2))]

    thresholds = gc.get_threshold()
    gc.callbacks.append(seen)
    try:
        kept = allocate()
        outside = len(full)
        full.clear()
        with pytest.raises(RuntimeError):
            with full_collections_held_back():
                assert gc.get_threshold()[:2] == thresholds[:2]  # young objects are collected as always
                kept += allocate()
                raise RuntimeError("a refused run")
        inside = len(full)
    finally:
        gc.callbacks.remove(seen)
    assert outside >= 1 and inside == 0
    assert gc.get_threshold() == thresholds


def test_under_a_command_what_the_checks_leave_alive_is_frozen_until_the_command_ends():
    """Under ``cli_main`` (a ``StartUp``) the objects alive after the checks leave the collector's sight until the
    command ends, so the run's full collections do not walk torch's objects again; not after a refused check,
    not outside a command, and objects someone else froze stay frozen."""
    import gc

    from ds_hydra.cli.preflight import full_collections_held_back
    from ds_hydra.common.startup import StartUp

    assert gc.get_freeze_count() == 0
    try:
        with StartUp.opened() as startup:
            with full_collections_held_back(startup):
                alive = object()  # noqa: F841
            assert gc.get_freeze_count() > 0 and startup.froze_objects
        assert gc.get_freeze_count() == 0 and not startup.froze_objects
        with StartUp.opened() as startup:
            with pytest.raises(RuntimeError), full_collections_held_back(startup):
                raise RuntimeError("a refused run")
            assert gc.get_freeze_count() == 0
        with full_collections_held_back(None):
            pass
        assert gc.get_freeze_count() == 0
        gc.freeze()  # the caller's own: still frozen after the command
        with StartUp.opened() as startup:
            with full_collections_held_back(startup):
                pass
            assert not startup.froze_objects
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
