"""Learning-rate schedules, step by step against hand-computed values (no DeepSpeed needed).

Convention (DeepSpeed's): ``lrs[n]`` is each group's lr after ``n`` calls of ``step()``, which is
iteration ``i = n - 1`` of the formulas; ``lrs[0]`` is the value set at construction. The trainer
steps the scheduler once after each optimizer step, so ``lrs[n]`` is the lr of optimizer step n + 1.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

import ds_hydra
from conftest import compose
from ds_hydra.deepspeed.lr_schedules import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR
from ds_hydra.optim.schedules import WarmupStableDecay
from ds_hydra.validation import config_problems

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of")

LOG3_LOG4 = 0.7924812503605781  # log(3) / log(4) = log2(3) / 2
COS30_RATIO = 0.9330127018922194  # (1 + cos(pi / 6)) / 2


def make_optimizer(lrs=(0.1,), cls=torch.optim.SGD):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    return cls([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def lr_sequence(scheduler, n_steps, group=0):
    """Group ``group``'s lr after 0, 1, ..., n_steps calls of ``step()``."""
    out = [scheduler.optimizer.param_groups[group]["lr"]]
    for _ in range(n_steps):
        scheduler.step()
        out.append(scheduler.optimizer.param_groups[group]["lr"])
    return out


def assert_values(actual, expected):
    assert len(actual) == len(expected)
    for n, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=1e-12, abs=1e-15), f"after {n} steps: {a} != {e}"


# -- exact values, case by case -------------------------------------------------------------------
def test_warmup_lr_log_default_uses_group_lr_and_holds():
    scheduler = WarmupLR(make_optimizer([0.1]), warmup_num_steps=4)  # max: the group's own lr
    # i = -1: min; i = 0: log(1) = 0; i = 1: log 2 / log 4; i = 2: log 3 / log 4; i >= 3: max
    assert_values(lr_sequence(scheduler, 6), [0.0, 0.0, 0.05, 0.1 * LOG3_LOG4, 0.1, 0.1, 0.1])


def test_warmup_lr_linear_between_min_and_max():
    scheduler = WarmupLR(make_optimizer([0.1]), 0.01, 0.05, warmup_num_steps=4, warmup_type="linear")
    assert_values(lr_sequence(scheduler, 6), [0.01, 0.01, 0.02, 0.03, 0.04, 0.05, 0.05])


def test_warmup_lr_one_step_warmup_is_two_steps():
    scheduler = WarmupLR(make_optimizer([0.1]), warmup_num_steps=1)  # DeepSpeed: max(2, warmup_num_steps)
    assert scheduler.warmup_num_steps == 2
    assert_values(lr_sequence(scheduler, 3), [0.0, 0.0, 0.1, 0.1])


def test_warmup_lr_per_group_lists():
    scheduler = WarmupLR(make_optimizer([1.0, 1.0]), [0.0, 0.02], [0.04, 0.06], warmup_num_steps=4, warmup_type="linear")
    assert_values(lr_sequence(scheduler, 3, group=0), [0.0, 0.0, 0.01, 0.02])
    assert_values([g["lr"] for g in scheduler.optimizer.param_groups], [0.02, 0.04])


def test_warmup_decay_lr_decays_to_min_and_holds():
    scheduler = WarmupDecayLR(make_optimizer(), total_num_steps=10, warmup_min_lr=0.0, warmup_max_lr=0.1,
                              warmup_num_steps=4, warmup_type="linear")
    # warmup i/4 for i < 4, then (10 - i) / (10 - 4): i=4 -> 1, i=7 -> 0.5, i=10 -> 0, then 0
    expected = [0.0, 0.0, 0.025, 0.05, 0.075, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.05, 0.1 * 2 / 6, 0.1 / 6, 0.0, 0.0, 0.0]
    assert_values(lr_sequence(scheduler, 13), expected)


def test_warmup_decay_lr_keeps_deepspeed_default_max_lr():
    scheduler = WarmupDecayLR(make_optimizer([0.5]), total_num_steps=10, warmup_num_steps=2)
    assert_values(lr_sequence(scheduler, 3), [0.0, 0.0, 0.001, 0.001])  # 0.001, not the group's 0.5


def test_warmup_cosine_lr_starts_at_zero_and_holds_floor():
    scheduler = WarmupCosineLR(make_optimizer([0.1]), total_num_steps=10, warmup_min_ratio=0.2,
                               warmup_num_steps=4, cos_min_ratio=0.1, warmup_type="linear")
    seq = lr_sequence(scheduler, 16)
    assert seq[0] == 0.0  # construction: 0 whatever warmup_min_ratio is
    assert_values(seq[1:4], [0.02, 0.04, 0.06])  # ratio 0.2 + 0.8 * i / 4
    assert seq[5] == pytest.approx(0.1 * (0.1 + 0.9 * COS30_RATIO), rel=1e-12)  # i = 4: progress 1/6
    assert seq[7] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5), rel=1e-12)  # i = 6: progress 1/2
    assert_values(seq[10:], [0.01] * 7)  # i >= 9: progress clamped to 1, the floor


def test_lr_range_test_continuous_and_staircase():
    continuous = LRRangeTest(make_optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=4,
                             lr_range_test_step_rate=0.5)
    assert_values(lr_sequence(continuous, 4), [0.01, 0.01125, 0.0125, 0.01375, 0.015])
    stairs = LRRangeTest(make_optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=4,
                         lr_range_test_step_rate=0.5, lr_range_test_staircase=True)
    assert_values(lr_sequence(stairs, 8), [0.01, 0.01, 0.01, 0.01, 0.015, 0.015, 0.015, 0.015, 0.02])


def test_one_cycle_lr_betas_and_decay():
    optimizer = make_optimizer([0.1], cls=torch.optim.Adam)
    scheduler = OneCycle(optimizer, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=4,
                         cycle_second_step_size=2, decay_step_size=2, decay_lr_rate=0.5,
                         cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.01)
    lrs, beta1s = [], []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        beta1s.append(optimizer.param_groups[0]["betas"][0])
        assert optimizer.param_groups[0]["betas"][1] == 0.99  # beta2 forced to 0.99
        scheduler.step()
    # heights over the 4 + 2 cycle: b = i + 1 -> 0, 1/4, 1/2, 3/4, 1, 1/2, 0; then decay d = i - 5
    assert_values(lrs[:7], [0.01, 0.035, 0.06, 0.085, 0.11, 0.06, 0.01])
    assert_values(lrs[7:], [0.01 / 1.25, 0.01 / 1.5, 0.01 / 1.75, 0.01 / 2.0])
    # beta1 starts at cycle_min_mom, then mirrors the lr between max and min momentum
    assert_values(beta1s[:7], [0.8, 0.875, 0.85, 0.825, 0.8, 0.85, 0.9])
    assert_values(beta1s[7:], [0.9 * 1.005, 0.9 * 1.01, 0.9 * 1.015, 0.9 * 1.02])


def test_one_cycle_stairs():
    scheduler = OneCycle(make_optimizer(), cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=4,
                         cycle_first_stair_count=2, cycle_momentum=False)
    # rising: floor(b * 2 / 4) / 2; falling: floor((8 - b) * 2 / 4) / 2; then hold the min
    assert_values(lr_sequence(scheduler, 9), [0.0, 0.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0])


def test_one_cycle_without_betas_leaves_momentum_alone():
    optimizer = make_optimizer(cls=lambda groups: torch.optim.SGD(groups, momentum=0.9))
    scheduler = OneCycle(optimizer, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=2)
    scheduler.step()
    assert not scheduler.cycle_momentum and optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    "shape,expected_tail",
    [
        ("linear", [1.0, 0.775, 0.55, 0.325]),  # 0.1 + 0.9 * (1 - p), p = 0, 1/4, 1/2, 3/4
        ("cosine", [1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55, 0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2]),
        ("sqrt", [1.0, 0.55, 0.1 + 0.9 * (1 - math.sqrt(0.5)), 0.1 + 0.9 * (1 - math.sqrt(0.75))]),
    ],
)
def test_wsd_warmup_stable_decay(shape, expected_tail):
    scheduler = WarmupStableDecay(make_optimizer([1.0]), warmup_steps=2, decay_steps=4, total_steps=10,
                                  min_lr_ratio=0.1, decay_shape=shape)
    seq = lr_sequence(scheduler, 12)  # seq[n] is the lr of step index n (0-based)
    assert_values(seq[:6], [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    assert_values(seq[6:10], expected_tail)
    assert_values(seq[10:], [0.1, 0.1, 0.1])


# -- the LRScheduler contract ---------------------------------------------------------------------
ALL_SCHEDULES = [
    ("warmup_lr", lambda o: WarmupLR(o, warmup_num_steps=5)),
    ("warmup_decay_lr", lambda o: WarmupDecayLR(o, total_num_steps=12, warmup_num_steps=4, warmup_max_lr=[0.2, 0.1])),
    ("warmup_cosine_lr", lambda o: WarmupCosineLR(o, total_num_steps=12, warmup_num_steps=3, warmup_min_ratio=0.1)),
    ("lr_range_test", lambda o: LRRangeTest(o, lr_range_test_step_size=3, lr_range_test_staircase=True)),
    ("one_cycle", lambda o: OneCycle(o, [0.01, 0.02], [0.1, 0.2], cycle_first_step_size=4, cycle_second_step_size=3,
                                     cycle_first_stair_count=2, decay_step_size=2, decay_lr_rate=0.3, decay_mom_rate=0.05)),
    ("wsd", lambda o: WarmupStableDecay(o, warmup_steps=2, decay_steps=4, total_steps=12)),
]


@pytest.mark.parametrize("name,build", ALL_SCHEDULES, ids=[n for n, _ in ALL_SCHEDULES])
def test_resume_continues_the_identical_sequence(name, build):
    """Save after k steps, load into a fresh optimizer and scheduler, continue: same lrs, betas, weights."""
    torch.manual_seed(0)

    def fresh():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam([{"params": [model.weight], "lr": 0.05}, {"params": [model.bias], "lr": 0.02}])
        return model, optimizer, build(optimizer)

    def train(model, optimizer, scheduler, steps, record):
        for step in range(len(record), len(record) + steps):
            x = torch.linspace(-1, 1, 6).view(2, 3) * (step + 1)
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            record.append([(g["lr"], tuple(g["betas"])) for g in optimizer.param_groups])

    model, optimizer, scheduler = fresh()
    reference_model = torch.nn.Linear(3, 2)
    reference_model.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam([{"params": [reference_model.weight], "lr": 0.05}, {"params": [reference_model.bias], "lr": 0.02}])
    ref_sched = build(ref_opt)
    uninterrupted = []
    train(reference_model, ref_opt, ref_sched, 16, uninterrupted)

    resumed = []
    train(model, optimizer, scheduler, 7, resumed)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data only, as the trainer loads it
    model, optimizer, scheduler = fresh()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    train(model, optimizer, scheduler, 9, resumed)

    assert resumed == uninterrupted
    assert torch.equal(model.weight, reference_model.weight) and torch.equal(model.bias, reference_model.bias)


@pytest.mark.parametrize("name,build", ALL_SCHEDULES, ids=[n for n, _ in ALL_SCHEDULES])
def test_is_an_lr_scheduler(name, build):
    optimizer = make_optimizer([0.1, 0.2], cls=torch.optim.Adam)
    scheduler = build(optimizer)
    assert isinstance(scheduler, LRScheduler) and isinstance(scheduler, ds_hydra._LRScheduler)
    scheduler.step()
    assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]


def test_step_with_iteration_jumps_like_deepspeed():
    a = WarmupCosineLR(make_optimizer([0.1]), total_num_steps=20, warmup_num_steps=5)
    b = WarmupCosineLR(make_optimizer([0.1]), total_num_steps=20, warmup_num_steps=5)
    for _ in range(9):
        a.step()
    b.step(8)  # DeepSpeed's step(last_batch_iteration)
    assert a.last_batch_iteration == b.last_batch_iteration == 8
    assert a.get_last_lr() == b.get_last_lr()


def test_exports_from_the_package():
    assert ds_hydra._LRScheduler is LRScheduler
    assert ds_hydra.WarmupCosineLR is WarmupCosineLR and ds_hydra.OneCycle is OneCycle
    assert ds_hydra.DeepSpeedSchedulerCallable.__origin__ is ds_hydra.DeepSpeedOptimizerCallable.__origin__


# -- what DeepSpeed rejects, and an unknown warmup_type (every refusal of a schedule's arguments) ------
@pytest.mark.parametrize(
    "build,fragment",
    [
        (lambda o: WarmupLR(o, warmup_num_steps=0), "warmup_num_steps must be a positive integer, got 0"),
        (lambda o: WarmupLR(o, warmup_num_steps=-3), "warmup_num_steps must be a positive integer"),
        (lambda o: WarmupLR(o, warmup_num_steps=None), "warmup_num_steps must be a positive integer, got None"),
        (lambda o: WarmupDecayLR(o, 100, warmup_num_steps=None), "warmup_num_steps must be a positive integer, got None"),
        (lambda o: WarmupCosineLR(o, 100, warmup_num_steps=-5), "warmup_num_steps must be a positive integer, got -5"),
        (lambda o: WarmupDecayLR(o, 100, warmup_num_steps=2.5), "warmup_num_steps must be a positive integer, got 2.5"),
        (lambda o: WarmupCosineLR(o, 100, warmup_num_steps=True), "warmup_num_steps must be a positive integer"),
        (lambda o: WarmupLR(o, warmup_type="cos"), "warmup_type='cos': allowed values: log, linear"),
        (lambda o: WarmupCosineLR(o, 100, warmup_type="exp"), "warmup_type='exp': allowed values: log, linear"),
        (lambda o: WarmupLR(o, warmup_min_lr=[0.0, 0.0, 0.0]), "warmup_min_lr: expected 2 values (one per param group), got 3"),
        (lambda o: LRRangeTest(o, lr_range_test_step_size=0), "lr_range_test_step_size must be a positive integer"),
        (lambda o: LRRangeTest(o, lr_range_test_step_size=-5), "lr_range_test_step_size must be a positive integer"),
        (lambda o: LRRangeTest(o, lr_range_test_min_lr=[1e-3]), "lr_range_test_min_lr: expected 2 values"),
        (lambda o: OneCycle(o, 0.01, 0.1, cycle_first_step_size=0), "cycle_first_step_size must be positive"),
        (lambda o: OneCycle(o, 0.01, 0.1, cycle_first_step_size=0, cycle_second_step_size=100), "cycle_first_step_size must be positive"),
        (lambda o: OneCycle(o, 0.01, 0.1, cycle_first_step_size=-1), "cycle_first_step_size must be positive"),
        (lambda o: OneCycle(o, 0.01, 0.1, cycle_second_step_size=-1), "cycle_second_step_size must be non-negative"),
        (lambda o: OneCycle(o, [0.001] * 3, 0.1), "cycle_min_lr: expected 2 values"),
        (lambda o: OneCycle(o, 0.01, [0.1, 0.1, 0.1]), "cycle_max_lr: expected 2 values"),
        (lambda o: OneCycle(o, 0.01, 0.1, cycle_min_mom=[0.8] * 3), "cycle_min_mom: expected 2 values"),
        (lambda o: OneCycle(o, 0.01, 0.1, cycle_max_mom=[0.9] * 3), "cycle_max_mom: expected 2 values"),
        (lambda o: WarmupStableDecay(o, warmup_steps=5, decay_steps=6, total_steps=10), "warmup_steps + decay_steps <= total_steps"),
        (lambda o: WarmupStableDecay(o, decay_shape="step"), "decay_shape='step': allowed values: linear, cosine, sqrt"),
    ],
)
def test_rejects_bad_arguments(build, fragment):
    optimizer = make_optimizer([0.1, 0.2], cls=torch.optim.Adam)
    before = [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ValueError) as info:
        build(optimizer)
    assert fragment in str(info.value)
    assert [g["lr"] for g in optimizer.param_groups] == before  # nothing touched


def test_non_optimizer_is_refused():
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        WarmupLR(object())


# -- the shipped options ---------------------------------------------------------------------------
def test_total_num_steps_follows_the_run():
    for option in ("warmup_decay_lr", "warmup_cosine_lr"):
        cfg = compose([f"scheduler={option}", "trainer.max_steps=321"])
        assert cfg.scheduler.total_num_steps == 321
    cfg = compose(["scheduler=warmup_cosine_lr", "trainer.max_steps=6"])
    assert cfg.scheduler.warmup_num_steps == 1  # 5% of 6 rounds to 0; DeepSpeed needs at least 1
    assert config_problems(cfg) == []


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["scheduler=warmup_lr", "scheduler.warmup_num_steps=0"], "scheduler.warmup_num_steps=0: must be a positive integer"),
        (["scheduler=warmup_lr", "scheduler.warmup_num_steps=5000"], "warmup longer than training"),
        (["scheduler=warmup_cosine_lr", "scheduler.warmup_num_steps=300", "scheduler.total_num_steps=200"],
         "must be <= scheduler.total_num_steps=200"),
        (["scheduler=warmup_cosine_lr", "scheduler.cos_min_ratio=1.5"], "scheduler.cos_min_ratio=1.5: must be in [0, 1]"),
        (["scheduler=warmup_decay_lr", "scheduler.warmup_max_lr=abc"], "scheduler.warmup_max_lr=abc: must be a number, null or a list"),
        (["scheduler=warmup_lr", "scheduler.warmup_min_lr=[0.0,-1.0]"], "scheduler.warmup_min_lr=[0.0, -1.0]"),
        (["scheduler=lr_range_test", "scheduler.lr_range_test_step_size=0"], "scheduler.lr_range_test_step_size=0: must be a positive integer"),
        (["scheduler=one_cycle", "scheduler.cycle_first_step_size=0"], "scheduler.cycle_first_step_size=0: must be a positive integer"),
        (["scheduler=one_cycle", "scheduler.cycle_max_mom=1.2"], "scheduler.cycle_max_mom=1.2"),
        (["scheduler=one_cycle", "scheduler.cycle_second_step_size=-2"], "scheduler.cycle_second_step_size=-2: must be >= 0"),
        (["scheduler=wsd", "scheduler.decay_steps=1990"], "must be <= scheduler.total_steps=2000"),
    ],
)
def test_validate_scheduler_names_the_key(overrides, fragment):
    problems = config_problems(compose(overrides))
    assert any(fragment in p for p in problems), problems


def test_unknown_warmup_type_fails_at_composition():
    from ds_hydra.errors import describe_exception

    with pytest.raises(Exception) as info:
        compose(["scheduler=warmup_cosine_lr", "scheduler.warmup_type=cos"])
    line = describe_exception(info.value)  # what the CLI prints
    assert "scheduler.warmup_type" in line and "allowed values: log, linear" in line, line


def test_build_scheduler_reports_group_count_mismatch_as_user_error():
    from ds_hydra.errors import UserError
    from ds_hydra.optim.build import build_scheduler

    cfg = compose(["scheduler=warmup_lr", "scheduler.warmup_min_lr=[0.0,0.0,0.0]"])
    with pytest.raises(UserError, match=r"scheduler: warmup_min_lr: expected 2 values \(one per param group\), got 3"):
        build_scheduler(cfg.scheduler, make_optimizer([0.1, 0.2]))


def test_no_warnings_when_stepped_after_the_optimizer():
    optimizer = make_optimizer([0.1])
    scheduler = WarmupCosineLR(optimizer, total_num_steps=10, warmup_num_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.step()
            scheduler.step()


def test_warmup_cosine_matches_nanogpt_formula():
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
