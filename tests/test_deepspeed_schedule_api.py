"""DeepSpeed's own unit tests of its schedules (tests/unit/runtime/test_lr_schedulers.py in
deepspeedai/DeepSpeed), their assertions re-stated against ds_hydra's classes.

DeepSpeed runs most of them through ``deepspeed.initialize`` with a config dict: the engine builds the
schedule from ``scheduler.params`` over an Adam with lr 0.00015 and, per batch, steps the optimizer and
then the schedule. Here a small model and a torch Adam play the engine, the schedule is built from
the same params, and the assertions are DeepSpeed's. DeepSpeed's tests of its argparse helpers
(``add_tuning_arguments``, ``get_config_from_args``) are not ported: ds_hydra configures schedules
through Hydra, not argparse. One deliberate difference: an unknown ``warmup_type`` is refused here,
where DeepSpeed warns and falls back to ``log`` (``test_unknown_warmup_type_is_refused``).
No DeepSpeed install is needed; ``test_deepspeed_parity.py`` compares with DeepSpeed's objects directly.
"""
from __future__ import annotations

import math

import pytest
import torch

from ds_hydra.deepspeed.lr_schedules import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of")  # schedules stepped without an optimizer step

ADAM_LR = 0.00015  # the "optimizer.params.lr" of DeepSpeed's test configs
SCHEDULES = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
    "LRRangeTest": LRRangeTest,
}


# -- the engine DeepSpeed's tests run through -----------------------------------------------------
class Engine:
    """DeepSpeed's SimpleModel-and-engine loop, reduced to what the schedule sees: per batch, forward,
    backward, ``optimizer.step()``, then ``scheduler.step()``."""

    def __init__(self, scheduler_type: str, params: dict, lr: float = ADAM_LR, hidden_dim: int = 10):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(hidden_dim, hidden_dim)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.lr_scheduler = SCHEDULES[scheduler_type](self.optimizer, **params)
        self.hidden_dim = hidden_dim

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def train_batch(self) -> None:
        x = torch.randn(2, self.hidden_dim)
        loss = self.model(x).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()


def continuous_decrease(values) -> bool:
    return all(a > b for a, b in zip(values, values[1:]))


def continuous_increase(values) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def staircase_increase(values, step_size: int) -> bool:
    return all(len(set(values[i:i + step_size])) == 1 for i in range(0, len(values), step_size))


# -- TestGetLrBeforeTrain, TestSchedulerOptimizerParity --------------------------------------------
BEFORE_TRAIN = [
    ("WarmupLR", {}),
    ("WarmupDecayLR", {"warmup_num_steps": 10, "total_num_steps": 20}),
    ("WarmupCosineLR", {"warmup_num_steps": 10, "total_num_steps": 20}),
    ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 0.1}),
    ("LRRangeTest", {}),
]


@pytest.mark.parametrize("scheduler_type,params", BEFORE_TRAIN, ids=[t for t, _ in BEFORE_TRAIN])
def test_get_lr_before_train(scheduler_type, params):
    engine = Engine(scheduler_type, params)
    assert engine.lr_scheduler.get_lr() == engine.get_lr()  # what construction wrote, exactly
    for _ in range(25):
        engine.lr_scheduler.get_lr()  # any time, without side effects
        engine.train_batch()


PARITY = [
    ("WarmupLR", {}),
    ("WarmupDecayLR", {"warmup_num_steps": 5, "total_num_steps": 10}),
    ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 0.1, "cycle_first_step_size": 5, "decay_step_size": 5}),
    ("LRRangeTest", {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 1}),
]


@pytest.mark.parametrize("scheduler_type,params", PARITY, ids=[t for t, _ in PARITY])
def test_scheduler_optimizer_parity(scheduler_type, params):
    engine = Engine(scheduler_type, params)
    for _ in range(25):
        engine.train_batch()
        assert engine.lr_scheduler.get_lr() == engine.get_lr()
        assert engine.lr_scheduler.get_last_lr() == engine.get_lr()


# -- TestLrSchedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup_num_steps", [10, 15, 19, 33])
@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_lr_warmup_schedule(warmup_num_steps, warmup_type):
    params = {"warmup_min_lr": 0.1, "warmup_max_lr": 0.2, "warmup_num_steps": warmup_num_steps, "warmup_type": warmup_type}
    engine = Engine("WarmupLR", params)
    step_lrs = []
    for _ in range(2 * warmup_num_steps):  # DeepSpeed: 2 * total_num_steps samples, 2 per batch
        engine.train_batch()
        step_lrs.append(engine.lr_scheduler.get_lr())
    assert step_lrs[0] == [0.1]
    assert step_lrs[warmup_num_steps] == [0.2]
    assert all(lr == [0.2] for lr in step_lrs[warmup_num_steps:])


@pytest.mark.parametrize("warmup_num_steps", [10, 15, 19, 33])
@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_lr_warmup_decay_schedule(warmup_num_steps, warmup_type):
    params = {"warmup_min_lr": 0.1, "warmup_max_lr": 0.2, "warmup_num_steps": warmup_num_steps,
              "total_num_steps": 2 * warmup_num_steps, "warmup_type": warmup_type}
    engine = Engine("WarmupDecayLR", params)
    step_lrs = []
    for _ in range(2 * warmup_num_steps):
        engine.train_batch()
        step_lrs.append(engine.lr_scheduler.get_lr())
    assert step_lrs[0] == [0.1]
    assert step_lrs[warmup_num_steps] == [0.2]
    previous = step_lrs[warmup_num_steps]
    for lr in step_lrs[warmup_num_steps + 1:]:
        assert lr < previous
        previous = lr


# -- TestLrRange --------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_lr,step_rate,step_size,staircase", [
    (1e-4, 1e-5, 1, True),
    (1e-5, 1e-5, 1, False),
    (1e-4, 1e-3, 10, True),
    (1e-3, 1e-3, 10, False),
    (1e-2, 1e-2, 19, True),
    (1e-2, 1e-2, 19, False),
])
def test_lr_range(min_lr, step_rate, step_size, staircase):
    engine = Engine("LRRangeTest", {"lr_range_test_min_lr": min_lr, "lr_range_test_step_rate": step_rate,
                                    "lr_range_test_step_size": step_size, "lr_range_test_staircase": staircase})
    step_lrs = []
    for _ in range(max(50, step_size * 2) // 2):
        step_lrs.extend(engine.lr_scheduler.get_lr())  # read before the batch, as DeepSpeed's test does
        engine.train_batch()
    assert step_lrs[0] == min_lr
    if staircase:
        assert staircase_increase(step_lrs, step_size)
    else:
        assert continuous_increase(step_lrs)


# -- TestOneCycle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_lr,max_lr,decay_rate,cycle_step_size,decay_step_size", [
    (1e-5, 1e-2, 1e-3, 10, 10),
    (1e-3, 1e-1, 0, 21, 21),
    (1e-3, 1e-1, 1e-1, 21, 21),
    (1e-5, 1e-1, 0, 10, 0),
])
def test_one_cycle_lr(min_lr, max_lr, decay_rate, cycle_step_size, decay_step_size):
    engine = Engine("OneCycle", {"cycle_min_lr": min_lr, "cycle_max_lr": max_lr, "decay_lr_rate": decay_rate,
                                 "cycle_first_step_size": cycle_step_size, "decay_step_size": decay_step_size})
    step_lrs = []
    for _ in range(max(50, cycle_step_size * 3) // 2):
        step_lrs.extend(engine.lr_scheduler.get_lr())
        engine.train_batch()
    assert step_lrs[0] == min_lr
    assert step_lrs[cycle_step_size] == max_lr
    assert continuous_increase(step_lrs[:cycle_step_size])
    assert continuous_decrease(step_lrs[cycle_step_size:cycle_step_size * 2])
    if decay_rate > 0:
        assert continuous_decrease(step_lrs[cycle_step_size * 2:])


@pytest.mark.parametrize("min_mom,max_mom,decay_rate,step_size", [
    (0.08, 0.09, 1e-3, 10),
    (0.08, 0.09, 0, 21),
])
def test_one_cycle_mom(min_mom, max_mom, decay_rate, step_size):
    engine = Engine("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_min_mom": min_mom,
                                 "cycle_max_mom": max_mom, "decay_mom_rate": decay_rate,
                                 "cycle_first_step_size": step_size, "decay_step_size": step_size})
    step_moms = []
    for _ in range(max(50, step_size * 3) // 2):
        step_moms.append(engine.lr_scheduler.get_mom())
        engine.train_batch()
    assert step_moms[0][0][0] == max_mom  # get_mom() before the first step: the formula's value
    assert step_moms[step_size][0][0] == min_mom
    assert continuous_decrease(step_moms[:step_size])
    assert continuous_increase(step_moms[step_size:step_size * 2])
    if decay_rate > 0:
        assert continuous_increase(step_moms[step_size * 2:])


def test_one_cycle_betas_in_the_optimizer_follow_get_mom_after_each_step():
    engine = Engine("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_first_step_size": 4})
    assert engine.optimizer.param_groups[0]["betas"] == (0.8, 0.99)  # construction writes cycle_min_mom
    for _ in range(12):
        engine.train_batch()
        assert [g["betas"] for g in engine.optimizer.param_groups] == engine.lr_scheduler.get_mom()


def test_one_cycle_get_mom_is_none_without_momentum_cycling():
    engine = Engine("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_momentum": False})
    assert engine.lr_scheduler.get_mom() is None


# -- TestWarmupCosineLR --------------------------------------------------------------------------------
@pytest.mark.parametrize("total_num_steps,warmup_num_steps,cos_min_ratio,warmup_min_ratio", [
    (100, 10, 0.1, 0.2),
    (200, 20, 0.1, 0.2),
    (500, 30, 0.0, 0.2),
    (600, 300, 0.1, 0.0),
    (600, 550, 0.0, 0.0),
])
def test_warmup_cosine_lr(total_num_steps, warmup_num_steps, cos_min_ratio, warmup_min_ratio):
    opt_lr = 0.0015
    scheduler = WarmupCosineLR(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=opt_lr),
                               total_num_steps=total_num_steps, warmup_min_ratio=warmup_min_ratio,
                               warmup_num_steps=warmup_num_steps, cos_min_ratio=cos_min_ratio)
    step_lrs = []
    for _ in range(max(50, total_num_steps * 3) // 2):
        scheduler.step()
        step_lrs.extend(scheduler.get_lr())
    assert abs(step_lrs[0] - opt_lr * warmup_min_ratio) < 1e-7
    assert abs(step_lrs[warmup_num_steps - 1] - opt_lr) < 1e-7
    assert abs(step_lrs[total_num_steps - 1] - opt_lr * cos_min_ratio) < 1e-7
    assert continuous_increase(step_lrs[:warmup_num_steps])
    assert continuous_decrease(step_lrs[warmup_num_steps:total_num_steps])


def two_groups(lrs=(0.0015, 0.003), cls=torch.optim.Adam, **kwargs):
    return cls([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], **kwargs)


def test_warmup_cosine_lr_initializes_all_param_groups():
    optimizer = two_groups()
    scheduler = WarmupCosineLR(optimizer=optimizer, total_num_steps=100, warmup_num_steps=10, warmup_min_ratio=0.0)
    assert scheduler.get_lr_ratio() == 0.0
    assert scheduler.get_lr() == [0.0, 0.0]
    assert scheduler.get_last_lr() == [0.0, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]

    scheduler.step(1)
    ratio = math.log(2) / math.log(10)
    expected = [0.0015 * ratio, 0.003 * ratio]
    assert scheduler.get_lr_ratio() == pytest.approx(ratio)
    assert scheduler.get_lr() == pytest.approx(expected)
    assert scheduler.get_last_lr() == pytest.approx(expected)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)


def test_warmup_lr_inherits_per_group_lr_when_max_unspecified():
    optimizer = two_groups((0.1, 0.2))
    scheduler = WarmupLR(optimizer=optimizer, warmup_num_steps=10)
    assert scheduler.max_lrs == [0.1, 0.2]
    scheduler.step(10)
    assert scheduler.get_lr() == pytest.approx([0.1, 0.2])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.2])


# -- a tensor lr is filled in place -------------------------------------------------------------------
TENSOR_LR_CONTRACTS = [
    pytest.param(LRRangeTest, {}, 1e-3, 1e-3 * (1 + 2 / 2000), id="LRRangeTest"),
    pytest.param(OneCycle, dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=10, cycle_second_step_size=10,
                                cycle_momentum=False), 0.01, 0.01 + (0.1 - 0.01) * 2 / 10, id="OneCycle"),
    pytest.param(WarmupLR, dict(warmup_num_steps=10), 0.0, 0.1 * math.log(2) / math.log(10), id="WarmupLR"),
    pytest.param(WarmupDecayLR, dict(total_num_steps=100, warmup_num_steps=10, warmup_max_lr=0.1), 0.0,
                 0.1 * math.log(2) / math.log(10), id="WarmupDecayLR"),
    pytest.param(WarmupCosineLR, dict(total_num_steps=100, warmup_num_steps=10), 0.0,
                 0.1 * math.log(2) / math.log(10), id="WarmupCosineLR"),
]


@pytest.mark.skipif(torch.__version__ < (2, 5), reason="torch < 2.5 replaces a tensor lr with a float")
@pytest.mark.parametrize("lr_shape", [(), (1,)])
@pytest.mark.parametrize("scheduler_cls,kwargs,init_lr,step_lr", TENSOR_LR_CONTRACTS)
def test_lr_scheduler_preserves_tensor_lr(scheduler_cls, kwargs, init_lr, step_lr, lr_shape):
    initial_lr = torch.full(lr_shape, 0.1, dtype=torch.float64)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=initial_lr)
    scheduler = scheduler_cls(optimizer=optimizer, **kwargs)
    for expected in (init_lr, step_lr):
        lr = optimizer.param_groups[0]["lr"]
        assert lr is initial_lr and lr.shape == lr_shape and lr.dtype == torch.float64
        assert lr.item() == pytest.approx(expected)
        scheduler.step(1)


def test_all_schedules_covered_by_tensor_lr_contract():
    assert {p.values[0] for p in TENSOR_LR_CONTRACTS} == set(SCHEDULES.values())


# -- edge cases (the arguments DeepSpeed refuses are tested in test_lr_schedules.py) ---------------------
def test_warmup_cosine_lr_total_num_steps_equals_warmup_num_steps():
    scheduler = WarmupCosineLR(two_groups((0.01,)), total_num_steps=10, warmup_num_steps=10, cos_min_ratio=0.1)
    for step in range(10, 15):
        scheduler.step(step)
        assert scheduler.get_lr_ratio() == pytest.approx(0.1)


def test_warmup_cosine_lr_linear_warmup_type_produces_linear_ratios():
    scheduler = WarmupCosineLR(two_groups((0.001,)), total_num_steps=100, warmup_num_steps=10,
                               warmup_min_ratio=0.0, warmup_type="linear")
    assert scheduler.warmup_type == "linear"
    for step in range(10):
        scheduler.step(step)
        assert scheduler.get_lr_ratio() == pytest.approx(step / 10)


def one_cycle_lrs(first_stair_count, steps=16, first_step_size=8, second_step_size=8, second_stair_count=None):
    scheduler = OneCycle(two_groups((0.001,), betas=(0.9, 0.99)), cycle_min_lr=0.001, cycle_max_lr=0.01,
                         cycle_first_step_size=first_step_size, cycle_second_step_size=second_step_size,
                         cycle_first_stair_count=first_stair_count, cycle_second_stair_count=second_stair_count)
    lrs = []
    for _ in range(steps):
        scheduler.step()
        lrs.append(scheduler.get_lr()[0])
    return lrs


def test_one_cycle_stair_count_holds_lr_flat():
    continuous = one_cycle_lrs(0)
    assert len(set(continuous[:8])) == 8
    stairs = one_cycle_lrs(2)
    assert stairs != continuous
    assert len(set(stairs[:8])) < len(set(continuous[:8]))
    assert stairs[0] == stairs[1]
    assert one_cycle_lrs(8) == continuous


def test_one_cycle_stair_count_handles_asymmetric_cycle():
    continuous = one_cycle_lrs(0, steps=31, first_step_size=10, second_step_size=21, second_stair_count=0)
    aligned = one_cycle_lrs(10, steps=31, first_step_size=10, second_step_size=21, second_stair_count=21)
    assert aligned == pytest.approx(continuous)
    assert aligned[9] == pytest.approx(0.01)
    first_only = one_cycle_lrs(2, steps=31, first_step_size=10, second_step_size=21, second_stair_count=0)
    second_only = one_cycle_lrs(0, steps=31, first_step_size=10, second_step_size=21, second_stair_count=3)
    assert first_only[:10] != continuous[:10] and first_only[10:] == continuous[10:]
    assert second_only[:10] == continuous[:10] and second_only[10:30] != continuous[10:30]




def test_one_cycle_allows_zero_second_step_size():
    scheduler = OneCycle(two_groups((0.1,), torch.optim.SGD), cycle_min_lr=0.001, cycle_max_lr=0.1,
                         cycle_first_step_size=100, cycle_second_step_size=0)
    assert scheduler.step_ratio == 1.0
    assert scheduler.get_lr() == [pytest.approx(0.001)]
    for _ in range(3):
        scheduler.step()
    assert scheduler.get_lr()[0] > 0.001


def test_one_cycle_accepts_per_group_lr_and_momentum_lists():
    optimizer = two_groups((0.1, 0.2), betas=(0.9, 0.99))
    scheduler = OneCycle(optimizer, cycle_min_lr=[0.001, 0.002], cycle_max_lr=[0.01, 0.02],
                         cycle_min_mom=[0.8, 0.85], cycle_max_mom=[0.9, 0.95], cycle_first_step_size=5,
                         cycle_second_step_size=5)
    assert scheduler.min_lrs == pytest.approx([0.001, 0.002])
    assert scheduler.max_lrs == pytest.approx([0.01, 0.02])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.002])
    assert [g["betas"][0] for g in optimizer.param_groups] == pytest.approx([0.8, 0.85])
    scheduler.step(4)  # the peak of the cycle
    assert scheduler.get_lr() == pytest.approx([0.01, 0.02])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.02])
    assert [g["betas"][0] for g in optimizer.param_groups] == pytest.approx([0.8, 0.85])
    scheduler.step(9)  # back at the bottom
    assert scheduler.get_lr() == pytest.approx([0.001, 0.002])
    assert [g["betas"][0] for g in optimizer.param_groups] == pytest.approx([0.9, 0.95])


def test_one_cycle_second_stair_count_falls_back_to_the_first():
    scheduler = OneCycle(two_groups((1e-3,)), cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=4,
                         cycle_first_stair_count=5)
    assert scheduler.first_stair_count == scheduler.second_stair_count == 5
    assert scheduler.second_step_size == scheduler.first_step_size == 4


@pytest.mark.parametrize("cycle_momentum", [False, True])
def test_cycle_momentum_decides_whether_betas_move(cycle_momentum):
    optimizer = two_groups((1e-3,), betas=(0.9, 0.999))
    scheduler = OneCycle(optimizer, cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=4,
                         cycle_min_mom=0.80, cycle_max_mom=0.99, cycle_momentum=cycle_momentum)
    assert scheduler.cycle_momentum is cycle_momentum
    seen = {optimizer.param_groups[0]["betas"][0]}
    for _ in range(4):
        scheduler.step()
        seen.add(optimizer.param_groups[0]["betas"][0])
    assert (len(seen) > 1) if cycle_momentum else (seen == {0.9})


# -- the rest of DeepSpeed's object API --------------------------------------------------------------
SMALL_PARAMS = {
    "WarmupLR": {"warmup_num_steps": 4},
    "WarmupDecayLR": {"total_num_steps": 20, "warmup_num_steps": 4},
    "WarmupCosineLR": {"total_num_steps": 20, "warmup_num_steps": 4},
    "OneCycle": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 3},
    "LRRangeTest": {"lr_range_test_step_size": 3},
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_state_dict_has_deepspeeds_key_and_loads_deepspeeds_state(name):
    params = SMALL_PARAMS[name]
    first = Engine(name, params).lr_scheduler
    for _ in range(5):
        first.step()
    assert first.state_dict()["last_batch_iteration"] == 4 == first.last_batch_iteration
    second = Engine(name, params).lr_scheduler
    second.load_state_dict({"last_batch_iteration": 4})  # what DeepSpeed's own schedules save
    assert second.last_batch_iteration == 4
    assert second.get_lr() == first.get_lr()
    first.step()
    second.step()
    assert second.get_last_lr() == first.get_last_lr()


def test_step_takes_deepspeeds_argument_names():
    scheduler = OneCycle(two_groups((1e-3,)), cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=4)
    scheduler.step(batch_iteration=3)  # DeepSpeed's name in OneCycle and LRRangeTest
    assert scheduler.last_batch_iteration == 3
    scheduler.step(last_batch_iteration=5)
    assert scheduler.last_batch_iteration == 5
    with pytest.raises(ValueError, match="two names of the same argument"):
        scheduler.step(last_batch_iteration=1, batch_iteration=2)
