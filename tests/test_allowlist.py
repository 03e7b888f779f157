"""The _target_ allowlist: only torch.optim, torch.optim.lr_scheduler, ds_hydra and user-listed prefixes."""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose
from ds_hydra.errors import UserError
from ds_hydra.instantiate import instantiate, is_allowed, target_problems


@pytest.fixture
def no_system_calls(monkeypatch):
    """Record any call of os.system / builtins.eval instead of running it."""
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(("os.system", a)) or 0)
    return calls


@pytest.mark.parametrize(
    "target, refused_because",
    [
        ("os.system", "not an allowed target"),
        ("builtins.eval", "not an allowed target"),
        # the path starts with an allowed prefix, but the object is os.system (posix.system / nt.system)
        ("ds_hydra.cli.os.system", "resolves to"),
        ("torch.optimizer_lookalike.X", "not an allowed target"),  # prefixes match whole dotted parts
    ],
)
def test_refused_targets_name_the_target_and_the_fix(target, refused_because, no_system_calls):
    node = OmegaConf.create({"_target_": target, "_args_": ["echo pwned"]})
    with pytest.raises(UserError) as err:
        instantiate(node)
    message = str(err.value)
    assert target in message and refused_because in message
    assert "allowed_targets" in message  # says how to allow it
    assert no_system_calls == []


def test_alias_is_refused_although_its_path_looks_allowed():
    assert is_allowed("ds_hydra.cli.os.system", ["ds_hydra"])  # the written path alone would pass
    [problem] = target_problems({"_target_": "ds_hydra.cli.os.system"}, ["ds_hydra"])
    assert re.search(r"resolves to (posix|nt)\.system", problem)


def test_nested_targets_are_checked_before_anything_is_built(no_system_calls):
    node = OmegaConf.create(
        {
            "_target_": "collections.OrderedDict",  # the outer callable is not allowed either
            "inner": {"_target_": "ds_hydra.optim.schedules.ConstantLR", "optimizer": {"_target_": "os.system", "_args_": ["true"]}},
            "items": [{"_target_": "builtins.eval", "_args_": ["1+1"]}],
        }
    )
    with pytest.raises(UserError) as err:
        instantiate(node)
    message = str(err.value)
    assert "3 config problems" in message  # every refused node, in one message
    for key in ("_target_=collections.OrderedDict", "inner.optimizer._target_=os.system", "items[0]._target_=builtins.eval"):
        assert key in message
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
