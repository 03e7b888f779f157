"""Optimizers and param groups: every option composes, instantiates over the GPT's groups and steps;
the weight-decay / lr-multiplier split has the counts the model's shapes predict."""
from __future__ import annotations

import inspect
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from ds_hydra.errors import ConfigError, UserError
from ds_hydra.instantiate import instantiate
from ds_hydra.models.build import build_model
from ds_hydra.models.contract import CausalLMLoss
from ds_hydra.optim import build
from ds_hydra.optim.build import (
    build_optimizer,
    has_fused_kernel,
    kernel_kwargs,
    optimizer_callable,
    param_group_table,
    param_groups_for,
)
from ds_hydra.validation import config_problems

OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))
VOCAB = 65


def gpt(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, VOCAB)


def split(overrides=(), model_overrides=("model=gpt_tiny",)):
    cfg = compose([*model_overrides, *overrides])
    model = gpt(cfg)
    groups = param_groups_for(model, cfg.optimizer, cfg.param_groups)
    return cfg, model, {g["name"]: g for g in groups}, [g["name"] for g in groups]


def numel(group):
    return sum(p.numel() for p in group["params"])


# gpt_tiny: C = 32 wide, L = 4 blocks, T = 32 positions, no biases; each block has qkv (3C x C),
# attn proj (C x C), mlp fc (4C x C), mlp proj (C x 4C) and two LayerNorm gains; plus ln_f.
C, L, T = 32, 4, 32
BLOCK_MATRICES = 3 * C * C + C * C + 4 * C * C + 4 * C * C  # 12 C^2
EMBEDDINGS = VOCAB * C + T * C  # wte (tied with lm_head, counted once) + wpe


def test_default_split_decays_matrices_and_embeddings_only():
    cfg, model, groups, order = split()
    assert order == ["decay", "no_decay"]
    decay, no_decay = groups["decay"], groups["no_decay"]
    assert len(decay["params"]) == 2 + 4 * L and numel(decay) == EMBEDDINGS + L * BLOCK_MATRICES
    assert len(no_decay["params"]) == 2 * L + 1 and numel(no_decay) == (2 * L + 1) * C
    assert decay["weight_decay"] == cfg.optimizer.weight_decay == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert numel(decay) + numel(no_decay) == sum(p.numel() for p in model.parameters())  # tied head counted once


def test_biases_never_decay():
    _, _, groups, _ = split(model_overrides=("model=gpt_tiny", "model.bias=true"))
    # biases: qkv 3C, attn proj C, fc 4C, mlp proj C per block; LayerNorms gain and bias
    assert numel(groups["no_decay"]) == 2 * (2 * L + 1) * C + L * 9 * C
    assert numel(groups["decay"]) == EMBEDDINGS + L * BLOCK_MATRICES


def test_embeddings_can_be_excluded_from_decay():
    _, _, groups, _ = split(["param_groups.decay_embeddings=false"])
    assert numel(groups["decay"]) == L * BLOCK_MATRICES and len(groups["decay"]["params"]) == 4 * L
    assert numel(groups["no_decay"]) == EMBEDDINGS + (2 * L + 1) * C


def test_no_decay_regexes():
    _, _, groups, _ = split(["param_groups.no_decay=['^wpe\\.','attn\\.proj']"])
    assert numel(groups["decay"]) == VOCAB * C + L * (BLOCK_MATRICES - C * C)
    assert numel(groups["no_decay"]) == T * C + L * C * C + (2 * L + 1) * C


def test_lr_rules_make_groups_with_scaled_lr():
    overrides = ["optimizer.lr=0.002", "param_groups.lr_rules=[{pattern:'^wte',lr_mult:0.5},{pattern:'blocks\\.3\\.',lr_mult:2.0}]"]
    cfg, _, groups, order = split(overrides)
    assert order == ["decay", "no_decay", "decay/lr_rules[0]", "decay/lr_rules[1]", "no_decay/lr_rules[1]"]
    assert groups["decay/lr_rules[0]"]["lr"] == pytest.approx(0.001) and numel(groups["decay/lr_rules[0]"]) == VOCAB * C
    assert groups["decay/lr_rules[1]"]["lr"] == pytest.approx(0.004) and numel(groups["decay/lr_rules[1]"]) == BLOCK_MATRICES
    assert numel(groups["no_decay/lr_rules[1]"]) == 2 * C and groups["no_decay/lr_rules[1]"]["weight_decay"] == 0.0
    assert "lr" not in groups["decay"]  # the optimizer's lr
    assert numel(groups["decay"]) == T * C + (L - 1) * BLOCK_MATRICES


def test_first_matching_rule_wins():
    _, _, groups, order = split(["param_groups.lr_rules=[{pattern:'^wte',lr_mult:0.5},{pattern:'^w',lr_mult:3.0}]"])
    assert numel(groups["decay/lr_rules[0]"]) == VOCAB * C and numel(groups["decay/lr_rules[1]"]) == T * C


def test_scheduler_scales_each_group_from_its_own_lr():
    cfg = compose(["model=gpt_tiny", "scheduler=warmup_cosine_lr", "trainer.max_steps=10",
                   "param_groups.lr_rules=[{pattern:'^wte',lr_mult:0.1}]"])
    optimizer = build_optimizer(cfg.optimizer, gpt(cfg), torch.device("cpu"), cfg.param_groups)
    scheduler = build.build_scheduler(cfg.scheduler, optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[2] == pytest.approx(0.1 * lrs[0], rel=1e-12) and lrs[0] > 0


def test_pattern_that_matches_nothing_is_a_user_error():
    with pytest.raises(UserError, match=r"param_groups.lr_rules\[0\].pattern='\^embed': matches no parameter"):
        split(["param_groups.lr_rules=[{pattern:'^embed',lr_mult:0.5}]"])
    with pytest.raises(UserError, match=r"param_groups.no_decay\[0\]='bias': matches no parameter"):
        split(["param_groups.no_decay=[bias]"])


def test_param_group_config_problems():
    cfg = compose(["param_groups.no_decay=['(']", "param_groups.lr_rules=[{pattern:wte,lr_mult:0}]"])
    problems = config_problems(cfg)
    assert any(p.startswith("param_groups.no_decay[0]='(': not a valid regular expression") for p in problems)
    assert "param_groups.lr_rules[0].lr_mult=0.0: must be > 0" in problems


def test_param_group_table_is_logged(caplog):
    cfg = compose(["model=gpt_tiny"])
    with caplog.at_level(logging.INFO, logger="ds_hydra.optim.build"):
        optimizer = build_optimizer(cfg.optimizer, gpt(cfg), torch.device("cpu"), cfg.param_groups)
    table = param_group_table(optimizer).splitlines()
    assert table[0].split() == ["group", "tensors", "params", "lr", "weight_decay"]
    assert table[1].split() == ["decay", "18", f"{EMBEDDINGS + L * BLOCK_MATRICES:,}", "0.001", "0.1"]
    assert table[2].split() == ["no_decay", "9", "288", "0.001", "0"]
    assert "\n".join(table) in caplog.text


# -- every optimizer option -------------------------------------------------------------------------
@pytest.mark.parametrize("option", OPTIMIZERS)
def test_optimizer_option_builds_over_gpt_groups_and_steps(option):
    if option in {"adamw8bit": "bitsandbytes", "adamw4bit": "torchao"}:
        pytest.importorskip({"adamw8bit": "bitsandbytes", "adamw4bit": "torchao"}[option], reason="optimizer=" + option + " needs the quant extra")
    cfg = compose(["model=gpt_tiny", f"optimizer={option}"])
    model = gpt(cfg)
    optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"), cfg.param_groups)
    assert type(optimizer).__name__ == cfg.optimizer._target_.rsplit(".", 1)[-1]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.optimizer.weight_decay, 0.0]
    assert all(g["lr"] == cfg.optimizer.lr for g in optimizer.param_groups)
    for key in ("betas", "eps", "momentum", "alpha", "lr_decay", "momentum_decay"):
        if key in cfg.optimizer:
            assert optimizer.defaults[key] == pytest.approx(cfg.optimizer[key]), key
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.randint(0, VOCAB, (2, 16))
    for _ in range(2):
        CausalLMLoss()(model(idx), idx).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "a parameter did not move"
    assert config_problems(cfg) == []


def test_optimizer_callable_takes_params_or_group_dicts():
    """The DeepSpeedOptimizerCallable contract: a list of parameters or a list of param-group dicts."""
    factory = optimizer_callable(compose(["optimizer=adamw"]).optimizer)
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    assert len(factory([a, b]).param_groups) == 1
    optimizer = factory([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_arguments_the_optimizer_class_lacks_are_refused_naming_the_key():
    """One schema for every optimizer: its keys bind to the class's signature before anything is built."""
    # torch.optim.AdamW has no decoupled_weight_decay argument (it is always decoupled)
    node = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "decoupled_weight_decay": False}
    with pytest.raises(ConfigError, match=r"^optimizer.decoupled_weight_decay: torch.optim.AdamW has no argument "
                                          r"'decoupled_weight_decay' \(did you mean 'weight_decay'\?\); it takes: params, lr, betas"):
        optimizer_callable(OmegaConf.create(node))
    del node["decoupled_weight_decay"]
    node["amsgrad"] = True  # an argument of the class, not of the schema
    optimizer = optimizer_callable(OmegaConf.create(node))([torch.nn.Parameter(torch.ones(1))])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["amsgrad"] is True


def test_optimizer_keys_are_checked_against_the_chosen_class():
    cfg = compose(["optimizer=sgd", "optimizer.momentum=0.5", "optimizer.nesterov=true", "optimizer.betas=[0.9,0.99]"])
    assert config_problems(cfg) == [
        "optimizer.betas: torch.optim.SGD has no argument 'betas'; it takes: "
        + ", ".join(inspect.signature(torch.optim.SGD).parameters)
    ]
    assert config_problems(compose(["optimizer=adam", "optimizer.betas=[0.8,0.9]", "optimizer.amsgrad=true"])) == []
    # the schema types only lr and weight_decay: the class's defaults say what the others take
    assert config_problems(compose(["optimizer.eps=abc", "optimizer.amsgrad=1", "optimizer.betas=0.9"])) == [
        "optimizer.betas=0.9: torch.optim.AdamW takes a list here (its default is (0.9, 0.999))",  # adamw.yaml sets it
        "optimizer.eps=abc: torch.optim.AdamW takes a number here (its default is 1e-08)",
        "optimizer.amsgrad=1: torch.optim.AdamW takes true or false here (its default is False)",
    ]
    # tasks that build no optimizer do not import its class to check it
    assert not [p for p in config_problems(compose(["+optimizer.betaz=1", "task=infer"])) if "betaz" in p]


@pytest.mark.parametrize("option", ["adam", "adamw", "sgd", "adagrad"])
def test_cpu_build_has_fused_kernels_the_auto_choice_looks_for(option):
    cls = instantiate(compose([f"optimizer={option}"]).optimizer).func
    assert has_fused_kernel(cls, "cpu")
    assert not has_fused_kernel(torch.optim.RMSprop, "cpu")  # no fused RMSprop exists


def test_kernel_choice_on_cuda(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernel_kwargs(torch.optim.AdamW, {}, cpu) == {}
    monkeypatch.setattr(build, "has_fused_kernel", lambda cls, device_type: True)
    assert kernel_kwargs(torch.optim.AdamW, {"fused": None, "foreach": None}, cuda) == {"fused": True}
    assert kernel_kwargs(torch.optim.RMSprop, {"foreach": None}, cuda) == {"foreach": True}  # no fused argument
    assert kernel_kwargs(torch.optim.AdamW, {"fused": False, "foreach": None}, cuda) == {"foreach": True}
    assert kernel_kwargs(torch.optim.AdamW, {"foreach": False}, cuda) == {}  # the user's choice stands
    assert kernel_kwargs(torch.optim.AdamW, {"fused": True}, cuda) == {}
    assert kernel_kwargs(torch.optim.AdamW, {"differentiable": True}, cuda) == {"foreach": True}
    monkeypatch.setattr(build, "has_fused_kernel", lambda cls, device_type: False)
    assert kernel_kwargs(torch.optim.Adagrad, {}, cuda) == {"foreach": True}  # a torch without CUDA Adagrad


def test_auto_kernel_reaches_the_optimizer(monkeypatch):
    monkeypatch.setattr(build, "has_fused_kernel", lambda cls, device_type: False)
    factory = optimizer_callable(compose(["optimizer=adamw"]).optimizer, torch.device("cuda"))
    assert factory.keywords["foreach"] is True


def test_optimizer_config_problems():
    cfg = compose(["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"])
    assert "optimizer.nesterov=true: needs optimizer.momentum > 0 and optimizer.dampening=0" in config_problems(cfg)
    cfg = compose(["optimizer=rmsprop", "optimizer.alpha=1.0"])
    assert "optimizer.alpha=1.0: must be in [0, 1)" in config_problems(cfg)
    cfg = compose(["optimizer=adam", "optimizer.fused=true", "optimizer.foreach=true"])
    assert any("pick one" in p for p in config_problems(cfg))


# -- the trainer --------------------------------------------------------------------------------------
def test_trainer_steps_warmup_cosine_lr_once_per_optimizer_step(tmp_path):
    """The lr logged for step n (the one that step used) is DeepSpeed's WarmupCosineLR after n - 1 steps."""
    from ds_hydra.training.metrics import read_metrics
    from ds_hydra.training.trainer import train

    steps, warmup = 10, 3
    cfg = compose(["model=gpt_tiny", "optimizer=adamw", "scheduler=warmup_cosine_lr", f"trainer.max_steps={steps}",
                   f"scheduler.warmup_num_steps={warmup}", "trainer.log_interval=1", "trainer.eval_interval=0",
                   "trainer.eval_batches=1", "trainer.batch_size=2", "trainer.device=cpu", "trainer.progress=false"])
    train(cfg, run_dir=tmp_path)
    logged = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r]

    def ratio(i):  # WarmupCosineLR, log warmup, warmup_min_ratio 0, cos_min_ratio 1e-4
        if i < 0:
            return 0.0
        if i < warmup:
            return math.log(i + 1) / math.log(warmup)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * min(1.0, (i - warmup + 1) / (steps - warmup)))) / 2

    assert logged == pytest.approx([1e-3 * ratio(n - 2) for n in range(1, steps + 1)], rel=1e-12, abs=0)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_optimizer_numbers_are_refused(value):
    """optimizer.lr=inf passes "> 0" but makes every weight nan at the first update: refused up front."""
    problems = config_problems(compose([f"optimizer.lr={value}", f"optimizer.weight_decay={value}",
                                        f"param_groups.lr_rules=[{{pattern:wte,lr_mult:{value}}}]"]))
    assert f"optimizer.lr={float(value)}: must be a finite number > 0" in problems
    assert f"optimizer.weight_decay={float(value)}: must be a finite number >= 0" in problems
    assert f"param_groups.lr_rules[0].lr_mult={float(value)}: must be a finite number > 0" in problems
