"""Every option of every shipped config group composes, and the building blocks instantiate."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from ds_hydra.instantiate import instantiate
from ds_hydra.optim.build import optimizer_callable
from ds_hydra.validation import config_problems

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "hydra")


def options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for group in ("model", "data", "optimizer", "scheduler", "ckpt", "trainer", "inference", "engine", "experiment"):
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_option_composes_and_resolves(group, option):
    if (group, option) == ("hparams_search", "optuna"):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna sweeper is an optional extra (sweeps)")
    cfg = compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no dangling interpolation


@pytest.mark.parametrize("option", options("model"))
def test_model_options_instantiate(option):
    cfg = compose([f"model={option}"])
    if cfg.model.n_embd > 512:
        pytest.skip("large preset: composition is checked above; building it is a GPU benchmark's job")
    model = instantiate(cfg.model, vocab_size=65)
    assert len(model.blocks) == cfg.model.n_layer
    logits, loss = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, 65) and torch.isfinite(loss)


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(option):
    corpus = instantiate(compose([f"data={option}"]).data)
    assert corpus.vocab_size >= 2 and len(corpus.train) > len(corpus.val) > 0
    assert int(corpus.train.max()) < corpus.vocab_size


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_options_are_callables_over_params(option):
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
    for _ in range(60):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] >= 0


def test_default_config_is_valid():
    assert config_problems(compose()) == []


def test_embedded_corpus_is_tiny_shakespeare():
    from ds_hydra.data.corpus import CharCorpus, embedded_corpus_text

    text = embedded_corpus_text()
    assert len(text) == 1_115_394
    corpus = CharCorpus()
    assert corpus.vocab_size == 65
    assert len(corpus.train) == int(len(text) * 0.9)  # nanoGPT's split
    assert corpus.decode(corpus.train[:14]) == text[:14] == "First Citizen:"


def test_batches_are_deterministic_and_shifted():
    from ds_hydra.data.batches import RandomBlocks

    tokens = torch.arange(1000)
    a = RandomBlocks(tokens, block_size=8, batch_size=4, seed=1)
    b = RandomBlocks(tokens, block_size=8, batch_size=4, seed=1)
    xa, ya = a.next_batch(torch.device("cpu"))
    xb, yb = b.next_batch(torch.device("cpu"))
    assert torch.equal(xa, xb) and torch.equal(ya, xa + 1)
    state = a.state_dict()
    next_a = a.next_batch(torch.device("cpu"))[0]
    a.load_state_dict(state)
    assert torch.equal(a.next_batch(torch.device("cpu"))[0], next_a)
    other_rank = RandomBlocks(tokens, block_size=8, batch_size=4, seed=1, rank=1)
    assert not torch.equal(other_rank.next_batch(torch.device("cpu"))[0], xa)


def test_warmup_cosine_matches_nanogpt_formula():
    import math

    from ds_hydra.optim.schedules import WarmupCosineDecay

    def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    scheduler = WarmupCosineDecay(optimizer, warmup_steps=100, total_steps=2000, min_lr_ratio=0.1)
    for it in range(2100):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(nanogpt_lr(it), rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from conftest import TINY
    from ds_hydra.training.trainer import train

    cfg = compose([*TINY, "logger=tensorboard", "trainer.max_steps=2"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["step"] == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
