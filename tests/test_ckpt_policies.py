"""Activation-checkpointing policies as classes: each chooses the blocks its own config says, one mapping
turns the ``ckpt`` group's keys (DeepSpeed's aliases included) into policy objects and refuses
conflicting keys in one line, and policy objects applied directly behave as the keys do."""
from __future__ import annotations

import ast
import logging

import pytest
import torch

from conftest import REPO, compose
from ds_hydra.activation_checkpointing import (
    Checkpointing,
    CkptConfig,
    EveryN,
    Full,
    MemoryBudget,
    Offload,
    Segments,
    Selective,
    checkpoint_activations,
    checkpointing_state,
)
from ds_hydra.activation_checkpointing.config import MemoryBudgetConfig, SegmentsConfig, map_ckpt
from ds_hydra.activation_checkpointing.policies import Region, from_config
from ds_hydra.activation_checkpointing.selective import selective_available
from ds_hydra.errors import ConfigError, UserError
from ds_hydra.models.gpt import GPT

R = Region


# -- each policy chooses the blocks its config says ------------------------------------------------------
@pytest.mark.parametrize("policy, selective, expected", [
    # 8 blocks in 2 segments of 4; the last one is left alone unless checkpoint_last
    (Segments(segments=2), False, [R(0, 4)]),
    (Segments(segments=2, checkpoint_last=True), False, [R(0, 4), R(4, 8)]),
    # 8 blocks in 3 segments: the larger ones first (3, 3, 2), so the one left alone is small
    (Segments(segments=3), False, [R(0, 3), R(3, 6)]),
    (Segments(segments=3, checkpoint_last=True), True, [R(0, 3, True), R(3, 6, True), R(6, 8, True)]),
    # one segment is always recomputed: leaving the only one alone would checkpoint nothing
    (Segments(segments=1), False, [R(0, 8)]),
    (Segments(segments=8), False, [R(i, i + 1) for i in range(7)]),
    (Full(), False, [R(i, i + 1) for i in range(8)]),
    (Full(), True, [R(i, i + 1, True) for i in range(8)]),
    (EveryN(n=3), False, [R(2, 3), R(5, 6)]),
    (EveryN(n=1), False, [R(i, i + 1) for i in range(8)]),
    (EveryN(n=8), True, [R(7, 8, True)]),
])
def test_each_block_policy_chooses_the_blocks_its_config_says(policy, selective, expected):
    assert policy.regions(8, selective=selective) == expected


class AdditiveProfile:
    """A stand-in for the probe's measurements: 100 bytes kept per block, 90 of them freed by recomputing
    the block fully, 50 by recomputing it selectively."""

    n_blocks = 4

    def kept_bytes(self, regions):
        return 400 - sum(90 if r.selective is False else 50 for r in regions for _ in range(r.size))

    def describe(self):
        return "additive"


def test_memory_budget_recomputes_fewest_blocks_fully_then_selectively():
    profile = AdditiveProfile()
    assert MemoryBudget(budget=400).regions(4, profile=profile) == []  # everything fits: nothing recomputed
    # 230 bytes: two full recomputes (400 - 2*90 = 220); one (310) is not enough; ties go to the first blocks
    assert MemoryBudget(budget=230).regions(4, profile=profile) == [R(0, 1), R(1, 2)]
    # with selective recompute allowed, four selective blocks (200) come before any full one
    assert MemoryBudget(budget=230).regions(4, selective=True, profile=profile) == [R(i, i + 1, True) for i in range(4)]
    # 150 bytes: four selective (200) and one full with three selective (160) do not fit; two full with two
    # selective (120) do, and fewer full recomputes come first
    assert MemoryBudget(budget=150).regions(4, selective=True, profile=profile) == [R(0, 1), R(1, 2), R(2, 3, True), R(3, 4, True)]
    # a share is of the un-checkpointed bytes: 50% of 400 = 200 -> three full (130), two would keep 220
    assert MemoryBudget(budget="50%").limit(profile) == 200
    assert MemoryBudget(budget="50%").regions(4, profile=profile) == [R(0, 1), R(1, 2), R(2, 3)]
    with pytest.raises(ValueError, match="memory_budget='auto' is fitted to trainer.memory_limit"):
        MemoryBudget(budget="auto").regions(4, profile=profile)


def test_policies_check_their_config():
    assert Segments(SegmentsConfig(2)) == Segments(segments=2) != Segments(segments=2, checkpoint_last=True)
    assert MemoryBudget(MemoryBudgetConfig("8GiB")) == MemoryBudget(budget="8GiB")
    with pytest.raises(ValueError, match=r"Segments\(segments=0, checkpoint_last=False\): segments must be 1\.\."):
        Segments(segments=0)
    with pytest.raises(ValueError, match=r"EveryN\(n=-1\): n must be 1\.\."):
        EveryN(n=-1)
    with pytest.raises(ValueError, match="ckpt.memory_budget=lots"):
        MemoryBudget(budget="lots")
    with pytest.raises(ValueError, match="needs ops to keep"):
        Selective(save_ops=())
    with pytest.raises(TypeError, match="expected a SegmentsConfig"):
        Segments(MemoryBudgetConfig("1GB"))
    assert Segments(segments=9).problems(4) == ["Segments(segments=9, checkpoint_last=False): segments must be 1..4 (the model has 4 blocks)"]


# -- the one mapping of the ckpt keys --------------------------------------------------------------------------
@pytest.mark.parametrize("option, expected", [
    ("none", Checkpointing()),
    ("segments", Checkpointing(block=Segments(segments=2))),
    ("full", Checkpointing(block=Full())),
    ("every_n", Checkpointing(block=EveryN(n=2))),
    ("selective", Checkpointing(selective=Selective())),
    ("offload", Checkpointing(offload=Offload())),
    ("memory_budget", Checkpointing(block=MemoryBudget(budget="50%"))),
    ("auto", Checkpointing(block=MemoryBudget(budget="auto"))),
    ("deepspeed", Checkpointing(block=Segments(segments=4))),  # number_checkpoints: 4
])
def test_each_shipped_ckpt_option_maps_to_its_policy(option, expected):
    assert from_config(compose([f"ckpt={option}"]).ckpt) == expected


def test_the_keys_map_to_policies_and_their_modifiers():
    def mapped(**keys):
        return from_config(CkptConfig(**keys))

    assert mapped(segments=4, checkpoint_last=True, selective=True, save_ops=["matmul"], offload=True) == Checkpointing(
        block=Segments(segments=4, checkpoint_last=True), selective=Selective(save_ops=("matmul",)), offload=Offload())
    # DeepSpeed's names: number_checkpoints is segments, cpu_checkpointing offload; the same count twice is fine
    assert mapped(number_checkpoints=3, cpu_checkpointing=True) == Checkpointing(block=Segments(segments=3), offload=Offload())
    assert mapped(number_checkpoints=3, segments=3).block == Segments(segments=3)
    assert mapped(number_checkpoints=0, segments=2).block == Segments(segments=2)
    # a budget keeps the save_ops its selectively recomputed blocks would keep
    assert mapped(memory_budget="1GB", save_ops=["matmul"]).block == MemoryBudget(budget="1GB", save_ops=("matmul",))
    options = mapped(full=True, blocks="transformer.h", use_reentrant=True, preserve_rng_state=False,
                     synchronize_checkpoint_boundary=True, profile=True).options
    assert (options.blocks, options.use_reentrant, options.preserve_rng_state, options.synchronize, options.profile) == (
        "transformer.h", True, False, True, True)


@pytest.mark.parametrize("keys, line", [
    (dict(segments=2, full=True, every_n=2),
     "ckpt: ckpt.segments, ckpt.full, ckpt.every_n each choose the recomputed blocks; set one "
     "(ckpt.selective and ckpt.offload combine with any of them)"),
    (dict(number_checkpoints=2, memory_budget="1GB"),
     "ckpt: ckpt.number_checkpoints, ckpt.memory_budget each choose the recomputed blocks; set one "
     "(ckpt.selective and ckpt.offload combine with any of them)"),
    (dict(segments=2, number_checkpoints=3),
     "ckpt.number_checkpoints=3: is DeepSpeed's name for ckpt.segments, which is 2; set one of them"),
    (dict(full=True, checkpoint_last=True), "ckpt.checkpoint_last=true: applies only with ckpt.segments=K (K >= 1)"),
])
def test_the_mapping_refuses_conflicting_keys_in_one_line(keys, line):
    assert map_ckpt(CkptConfig(**keys))[1] == [line]
    with pytest.raises(ConfigError) as caught:
        checkpoint_activations(gpt(), **keys)
    assert str(caught.value) == line


# -- policy objects applied directly ---------------------------------------------------------------------------
def gpt(n_layer=4):
    torch.manual_seed(0)
    return GPT(65, n_layer=n_layer, n_head=2, n_embd=32, block_size=16, dropout=0.1)


BATCH = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))


def grads(model):
    torch.manual_seed(3)
    model(BATCH).float().pow(2).mean().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("policy, keys", [
    (Segments(segments=2, checkpoint_last=True), dict(segments=2, checkpoint_last=True)),
    (EveryN(n=2), dict(every_n=2)),
    ([Full(), Offload()], dict(full=True, offload=True)),
    ([Selective(), EveryN(n=2)], dict(every_n=2, selective=True)),
])
def test_policy_objects_apply_as_the_keys_do(policy, keys):
    if "selective" in keys and not selective_available():
        pytest.skip("torch without the selective-checkpoint API")
    by_object = checkpoint_activations(gpt(), policy=policy)
    by_keys = checkpoint_activations(gpt(), **keys)
    state = checkpointing_state(by_object)
    assert state.regions == checkpointing_state(by_keys).regions and state.regions
    assert state.policy == checkpointing_state(by_keys).policy
    assert all(torch.equal(a, b) for a, b in zip(grads(by_object), grads(gpt())))  # dropout replayed: bit-identical


def test_policy_objects_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"Segments\(segments=9, checkpoint_last=False\): segments must be 1..4 \(the model has 4 blocks\)"):
        checkpoint_activations(gpt(), policy=Segments(segments=9))
    with pytest.raises(UserError, match=r"Full\(\) and EveryN\(n=2\) each choose the recomputed blocks; pass one"):
        checkpoint_activations(gpt(), policy=[Full(), EveryN(n=2)])
    with pytest.raises(TypeError, match="'full' is not a policy"):
        checkpoint_activations(gpt(), policy="full")
    with pytest.raises(UserError, match="pass policy objects or the ckpt keywords, not both"):
        checkpoint_activations(gpt(), policy=Full(), segments=2)
    with pytest.raises(UserError, match=r"ckpt.memory_budget=40%: the plan is measured on a batch"):
        checkpoint_activations(gpt(), policy=MemoryBudget(budget="40%"))


def test_the_plan_log_names_measured_bytes_and_no_second_peak_model(caplog):
    """The step's peak is the memory estimate's alone (replayed on fake tensors); the plan's log line gives
    the bytes the probe measured and the budget, never an analytic peak beside it."""
    with caplog.at_level(logging.INFO, logger="ds_hydra.activation_checkpointing"):
        model = checkpoint_activations(gpt(), example_input=(BATCH,), policy=MemoryBudget(budget="50%"))
    state = checkpointing_state(model)
    none = state.activation_profile.kept_bytes([])
    assert state.activation_profile.kept_bytes(state.regions) <= none // 2 < none
    assert "kept for backward" in caplog.text and "; budget " in caplog.text and "peak" not in caplog.text


def test_activation_checkpointing_imports_no_private_names():
    """Each module uses the others through their public names (apply once reached into the planner's)."""
    found = []
    for path in sorted((REPO / "ds_hydra" / "activation_checkpointing").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ds_hydra"):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found
