"""Every option of every shipped config group composes, and what it names instantiates and works."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from ds_hydra.activation_checkpointing.blocks import model_blocks
from ds_hydra.instantiate import instantiate
from ds_hydra.models.build import build_model
from ds_hydra.models.config import configured_blocks
from ds_hydra.models.contract import CausalLMLoss, logits_of
from ds_hydra.optim.build import optimizer_callable
from ds_hydra.validation import config_problems

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "hydra")


def options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]
# Options that need a value of the user's before they resolve.
COMPLETIONS = {
    ("model", "custom"): ["model._target_=ds_hydra.models.gpt.GPT"],
    ("model", "hf_causal_lm"): ["+model.config.model_type=llama", "+model.config.hidden_size=32",
                                "+model.config.intermediate_size=64", "+model.config.num_hidden_layers=2",
                                "+model.config.num_attention_heads=2"],
    ("data", "tokens"): ["data.dir=data/mycorpus"],
}
HF_MODEL_OPTIONS = {"hf_llama", "hf_gpt2", "hf_causal_lm"}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_option_composes_and_resolves(group, option):
    if group == "optimizer" and option in {"adamw8bit": "bitsandbytes", "adamw4bit": "torchao"}:
        pytest.importorskip({"adamw8bit": "bitsandbytes", "adamw4bit": "torchao"}[option], reason="optimizer=" + option + " needs the quant extra")
    if (group, option) == ("hparams_search", "optuna"):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna sweeper is an optional extra (sweeps)")
    if group == "logger" and option in TRACKER_PACKAGES:  # a tracker without its package is refused (test_tracking)
        pytest.importorskip(TRACKER_PACKAGES[option], reason=f"logger={option} is an optional extra ({option})")
    cfg = compose([f"{group}={option}", *COMPLETIONS.get((group, option), [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no dangling interpolation
    assert config_problems(cfg) == []


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build_and_meet_the_contract(option):
    if option in HF_MODEL_OPTIONS:
        pytest.importorskip("transformers", reason="Hugging Face models are an optional extra (hf)")
    cfg = compose([f"model={option}", *COMPLETIONS.get(("model", option), [])])
    if (cfg.model.get("n_embd") or 0) > 512:
        pytest.skip("large preset: composition is checked above; building it is a GPU benchmark's job")
    model = build_model(cfg.model, vocab_size=65)
    _, blocks = model_blocks(model)
    assert blocks and configured_blocks(cfg.model) in (None, len(blocks))  # the list checkpointing, compile, FSDP use
    ids = torch.randint(0, 65, (2, 8))
    output = model(ids)
    assert logits_of(output).shape[:2] == (2, 8) and logits_of(output).shape[2] >= 65
    loss = CausalLMLoss()(output, ids)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(option, tmp_path):
    from ds_hydra.training.slices import run_data

    overrides = [f"data={option}"]
    if option == "tokens":  # a directory as nanoGPT's prepare scripts write it
        ids = np.arange(5000, dtype=np.uint16) % 50
        ids[:4500].tofile(tmp_path / "train.bin")
        ids[4500:].tofile(tmp_path / "val.bin")
        overrides.append(f"data.dir={tmp_path}")
    data = run_data(compose(overrides))
    assert data.vocab_size >= 2 and data.num_tokens("train") > data.num_tokens("val") > 0
    assert int(data.tokens("train").max()) < data.vocab_size
    batch = data.sampler("train", seq_len=64, batch_size=2, seed=0).next_batch(torch.device("cpu"))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 64)


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_options_are_callables_over_params(option):
    if option in {"adamw8bit": "bitsandbytes", "adamw4bit": "torchao"}:
        pytest.importorskip({"adamw8bit": "bitsandbytes", "adamw4bit": "torchao"}[option], reason="optimizer=" + option + " needs the quant extra")
    cfg = compose([f"optimizer={option}"])
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizer_callable(cfg.optimizer)([param])  # drops arguments this torch lacks, if left at their default
    param.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(param.detach(), torch.ones(3))


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_options_are_callables_over_optimizer(option):
    cfg = compose([f"scheduler={option}", "trainer.max_steps=50"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    assert type(scheduler).__module__.startswith(("ds_hydra.optim", "ds_hydra.deepspeed", "torch.optim"))  # DeepSpeed's schedules live in ds_hydra.deepspeed
    lrs = []
    for _ in range(60):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(lr >= 0 for lr in lrs)
    # every schedule but the constant one moves the learning rate within the run
    assert (len(set(lrs[:50])) == 1) == (option == "constant"), lrs[:50]


def test_default_config_is_valid():
    assert config_problems(compose()) == []


@pytest.mark.parametrize("max_steps,warmup", [(2000, 100), (300, 15), (10, 0)])
def test_schedule_lengths_follow_the_run_length(max_steps, warmup):
    """The default schedule's warmup is 5% of trainer.max_steps (rounded) and its decay ends with the run."""
    cfg = compose([f"trainer.max_steps={max_steps}"])
    assert (cfg.scheduler.warmup_steps, cfg.scheduler.total_steps) == (warmup, max_steps)
