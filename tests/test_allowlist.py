"""The _target_ allowlist: the callables ds_hydra ships for each key (SHIPPED_TARGETS), and user-listed prefixes."""
from __future__ import annotations

import collections
import os
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from ds_hydra.errors import UserError
from ds_hydra.instantiate import SHIPPED_TARGETS, instantiate, is_allowed, target_problems


@pytest.fixture
def no_system_calls(monkeypatch):
    """Record any call of os.system / builtins.eval instead of running it."""
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(("os.system", a)) or 0)
    return calls


@pytest.mark.parametrize(
    "target",
    ["os.system", "builtins.eval", "torch.optimizer_lookalike.X", "torch.optim.Optimizer.load_state_dict"],
)
def test_refused_targets_name_the_target_and_the_fix(target, no_system_calls):
    node = OmegaConf.create({"_target_": target, "_args_": ["echo pwned"]})
    with pytest.raises(UserError) as err:
        instantiate(node)
    message = str(err.value)
    assert f"_target_={target}: not an allowed target" in message
    assert f"allowed_targets=[{target.rsplit('.', 1)[0]}]" in message  # says how to allow one's own code
    assert no_system_calls == []


@pytest.mark.parametrize(
    "target",
    [
        "ds_hydra.cli.os.system",  # an alias under ds_hydra: the package is not on the list, its builders are
        "ds_hydra.cli.torchrun_job.run_job",  # a launcher: takes a command line
        "ds_hydra.training.state.safe_torch_load",  # a loader: takes a file name
    ],
)
def test_ds_hydra_itself_is_not_a_prefix_only_its_builders_are(target, no_system_calls):
    [problem] = target_problems(OmegaConf.create({"model": {"_target_": target, "_args_": ["true"]}}).model, [], "model")
    assert problem.startswith(f"model._target_={target}: not an allowed target (as model ds_hydra builds only "
                              "ds_hydra.models.gpt.GPT, ds_hydra.models.hf.causal_lm")
    assert "allowed_targets" not in problem  # not advice to open ds_hydra's internals
    assert no_system_calls == []


def test_each_key_admits_only_its_own_kind_of_builder():
    """A run's saved model cannot name a data class or a callback (a shipped builder of another key)."""
    assert target_problems({"_target_": "ds_hydra.models.gpt.GPT"}, [], "model") == []
    [problem] = target_problems({"_target_": "ds_hydra.data.corpus.SyntheticTokens"}, [], "model")
    assert "not an allowed target (as model ds_hydra builds only" in problem
    [problem] = target_problems({"_target_": "ds_hydra.cli.preflight.Preflight"}, [], "optimizer")
    assert "as optimizer ds_hydra builds torch.optim's optimizer classes" in problem
    assert target_problems({"_target_": "ds_hydra.cli.preflight.Preflight"}, [], "hydra.callbacks.preflight") == []


def test_every_shipped_target_exists_and_is_callable():
    for key, names in SHIPPED_TARGETS.items():
        for name in names:
            if name.startswith("torch.optim.") and not hasattr(torch.optim if "lr_scheduler" not in name else torch.optim.lr_scheduler, name.rsplit(".", 1)[-1]):
                continue  # listed for the torch versions that have it
            if importlib.util.find_spec(name.split(".")[0]) is None:
                continue  # an optional extra's class (bitsandbytes, torchao): checked where the extra is installed
            assert target_problems({"_target_": name}, [], key) == [], name


def test_alias_is_refused_although_its_path_looks_allowed():
    assert is_allowed("ds_hydra.cli.os.system", ["ds_hydra"])  # the written path alone would pass
    [problem] = target_problems({"_target_": "ds_hydra.cli.os.system"}, ["ds_hydra"])
    assert re.search(r"resolves to (posix|nt)\.system", problem)


def test_nested_targets_are_checked_before_anything_is_built(no_system_calls):
    node = OmegaConf.create(
        {
            "_target_": "ds_hydra.optim.schedules.ConstantLR",
            "optimizer": {"_target_": "os.system", "_args_": ["true"]},
            "items": [{"_target_": "builtins.eval", "_args_": ["1+1"]}],
            "outer": {"_target_": "collections.OrderedDict", "inner": {"_target_": "os.system"}},  # refused as a whole
        }
    )
    with pytest.raises(UserError) as err:
        instantiate(node)
    message = str(err.value)
    assert "3 config problems" in message  # every refused node, in one message
    for key in ("optimizer._target_=os.system", "items[0]._target_=builtins.eval", "outer._target_=collections.OrderedDict"):
        assert key in message
    assert "inner" not in message  # inside a refused node: it will not be built either
    assert no_system_calls == []


def test_user_listed_prefix_is_allowed_from_the_composed_config():
    cfg = compose(["allowed_targets=[collections]"])
    cfg.data = OmegaConf.create({"_target_": "collections.Counter", "a": 2})
    assert instantiate(cfg.data) == collections.Counter(a=2)

    refused = compose([])  # the same node without the prefix listed
    refused.data = OmegaConf.create({"_target_": "collections.Counter", "a": 2})
    with pytest.raises(UserError, match="allowed_targets=\\[collections\\]"):
        instantiate(refused.data)


def test_user_prefix_does_not_open_an_alias_out_of_it():
    """Allowing a prefix allows what is defined there, not what it imports from elsewhere."""
    cfg = compose(["allowed_targets=[ds_hydra.cli]"])
    cfg.data = OmegaConf.create({"_target_": "ds_hydra.cli.os.system", "_args_": ["true"]})
    with pytest.raises(UserError, match="resolves to"):
        instantiate(cfg.data)


def test_shipped_targets_instantiate():
    cfg = compose(["model=gpt_tiny", "optimizer=sgd", "scheduler=constant"])
    factory = instantiate(cfg.optimizer)  # a partial over the optimizer class
    assert factory.func.__name__ == "SGD" and factory.keywords["lr"] == cfg.optimizer.lr


def test_nothing_else_calls_hydras_instantiate():
    """Every _target_ goes through ds_hydra.instantiate, the one place that applies the allowlist."""
    offenders = []
    for path in (REPO / "ds_hydra").rglob("*.py"):
        if path.name == "instantiate.py" and path.parent.name == "ds_hydra":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"from hydra\.utils import[^\n]*\b(instantiate|call)\b|hydra\.utils\.(instantiate|call)\b", text):
            offenders.append(str(Path(path).relative_to(REPO)))
    assert offenders == []
