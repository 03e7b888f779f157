"""The [eval] extra stays optional: ds_hydra imports without it, and task=lm_eval names it in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, compose


def test_import_ds_hydra_does_not_import_the_harness():
    # the modules every command imports (the trainer imports ds_hydra.harness.run only when after_training is on)
    code = ("import sys, ds_hydra, ds_hydra.cli, ds_hydra.config_store, ds_hydra.validation, ds_hydra.harness.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'datasets')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_task_without_the_extra_names_it(monkeypatch, tmp_path):
    from ds_hydra.errors import UserError
    from ds_hydra.harness.run import lm_eval_task

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    cfg = compose(["task=lm_eval", "lm_eval.tasks=[arc_easy]", f"inference.checkpoint={tmp_path}"])
    with pytest.raises(UserError, match=r"^task=lm_eval: the lm-evaluation-harness is not installed: pip install 'ds-hydra\[eval\]'$"):
        lm_eval_task(cfg, tmp_path / "out")


def test_after_training_without_the_extra_is_refused_before_training(monkeypatch):
    import importlib.util

    from ds_hydra.harness import config as harness_config
    from ds_hydra.validation import config_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(harness_config, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    problems = config_problems(compose(["lm_eval.after_training=true", "lm_eval.tasks=[arc_easy]"]))
    assert "lm_eval.after_training=true: the lm-evaluation-harness is not installed: pip install 'ds-hydra[eval]'" in problems
