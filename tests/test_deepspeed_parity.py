"""Differential tests: ds_hydra's schedules against DeepSpeed's own classes, step by step.

Each case builds DeepSpeed's ``deepspeed.runtime.lr_schedules.<Name>`` and ours with the same
arguments over two identical optimizers (3 param groups with different lrs), steps both through the
warmup, the decay and well past the end, and requires every group's lr (and OneCycle's betas) to agree
to 1e-12 relative after every step. The largest relative difference seen is printed after the module.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
ds_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules", reason="deepspeed is not installed")

from ds_hydra.deepspeed import lr_schedules as ours  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of")

REL_TOL = 1e-12
GROUP_LRS = (1e-3, 3e-4, 5e-2)
LARGEST = {"rel_diff": 0.0, "case": None, "values": 0}

CASES = [
    # WarmupLR: DeepSpeed's defaults (log warmup over 1000 steps to each group's own lr), short and
    # degenerate warmups, linear warmup, per-group lists, explicit scalar bounds
    ("WarmupLR", {}, 1100),
    ("WarmupLR", {"warmup_num_steps": 1}, 10),
    ("WarmupLR", {"warmup_num_steps": 2}, 10),
    ("WarmupLR", {"warmup_num_steps": 7, "warmup_type": "linear"}, 20),
    ("WarmupLR", {"warmup_num_steps": 13, "warmup_min_lr": [1e-5, 0.0, 2e-4], "warmup_max_lr": [1e-2, 2e-3, 0.1]}, 40),
    ("WarmupLR", {"warmup_num_steps": 5, "warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3, "warmup_type": "linear"}, 20),
    # WarmupDecayLR: default max 0.001, decay to min and hold, total shorter than / equal to the warmup
    ("WarmupDecayLR", {"total_num_steps": 3000}, 3100),
    ("WarmupDecayLR", {"total_num_steps": 40, "warmup_num_steps": 10}, 60),
    ("WarmupDecayLR", {"total_num_steps": 40, "warmup_num_steps": 10, "warmup_max_lr": None, "warmup_min_lr": [1e-5, 2e-5, 3e-5]}, 60),
    ("WarmupDecayLR", {"total_num_steps": 25, "warmup_num_steps": 6, "warmup_type": "linear", "warmup_max_lr": [1e-2, 2e-2, 3e-2]}, 40),
    ("WarmupDecayLR", {"total_num_steps": 3, "warmup_num_steps": 8}, 20),
    ("WarmupDecayLR", {"total_num_steps": 8, "warmup_num_steps": 8, "warmup_type": "linear"}, 20),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_num_steps": 1}, 40),
    # WarmupCosineLR: defaults, ratios, linear warmup, one-step warmup, no decay window, zero floor
    ("WarmupCosineLR", {"total_num_steps": 2000}, 2100),
    ("WarmupCosineLR", {"total_num_steps": 50, "warmup_num_steps": 10}, 70),
    ("WarmupCosineLR", {"total_num_steps": 50, "warmup_num_steps": 10, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01,
                        "warmup_type": "linear"}, 70),
    ("WarmupCosineLR", {"total_num_steps": 20, "warmup_num_steps": 1, "cos_min_ratio": 0.0}, 30),
    ("WarmupCosineLR", {"total_num_steps": 5, "warmup_num_steps": 9}, 20),
    ("WarmupCosineLR", {"total_num_steps": 9, "warmup_num_steps": 9, "warmup_min_ratio": 0.5}, 20),
    ("WarmupCosineLR", {"total_num_steps": 10, "warmup_num_steps": 9}, 20),
    # LRRangeTest: continuous and staircase, per-group lists, step size 1
    ("LRRangeTest", {}, 4100),
    ("LRRangeTest", {"lr_range_test_step_size": 3, "lr_range_test_step_rate": 2.0, "lr_range_test_staircase": True}, 30),
    ("LRRangeTest", {"lr_range_test_min_lr": [1e-5, 1e-4, 1e-3], "lr_range_test_step_size": 7, "lr_range_test_step_rate": 0.3}, 40),
    ("LRRangeTest", {"lr_range_test_min_lr": 2e-4, "lr_range_test_step_size": 1, "lr_range_test_staircase": True}, 10),
    # OneCycle: DeepSpeed's defaults, asymmetric halves with stairs and decay, lists, momentum off,
    # a zero-length falling half, stairs that do not divide the half, decay of lr only / momentum only
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2}, 4100),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 10, "cycle_second_step_size": 7,
                  "cycle_first_stair_count": 3, "cycle_second_stair_count": 2, "decay_step_size": 5,
                  "decay_lr_rate": 0.1, "decay_mom_rate": 0.01}, 60),
    ("OneCycle", {"cycle_min_lr": [1e-4, 2e-4, 3e-4], "cycle_max_lr": [1e-2, 2e-2, 3e-2], "cycle_first_step_size": 9,
                  "cycle_min_mom": [0.8, 0.85, 0.7], "cycle_max_mom": [0.9, 0.95, 0.92], "decay_step_size": 4,
                  "decay_lr_rate": 0.2}, 40),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 6, "cycle_momentum": False}, 20),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 6, "cycle_second_step_size": 0}, 20),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 7, "cycle_first_stair_count": 3}, 30),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 5, "cycle_second_step_size": 11,
                  "cycle_first_stair_count": 4, "decay_step_size": 3, "decay_mom_rate": 0.02}, 40),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


@pytest.fixture(scope="module", autouse=True)
def report_largest_difference(request):
    """After the module's comparisons, whichever of them ran, print how many values they compared and the
    largest relative difference (README quotes it). Each comparison asserts its own tolerance."""
    yield
    if LARGEST["values"]:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\nschedule parity: {LARGEST['values']} values compared, largest relative difference "
                  f"{LARGEST['rel_diff']:.3g}" + (f" ({LARGEST['case']})" if LARGEST["case"] else ""))


def optimizer_pair(cls=torch.optim.Adam):
    """Two identical optimizers with 3 groups of different lrs."""

    def make():
        params = [torch.nn.Parameter(torch.zeros(2)) for _ in GROUP_LRS]
        return cls([{"params": [p], "lr": lr} for p, lr in zip(params, GROUP_LRS)])

    return make(), make()


def rel_diff(a: float, b: float) -> float:
    a, b = float(a), float(b)
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def compare_groups(reference, candidate, case: str, after: int) -> None:
    """Every group's lr (and betas when present) agree to REL_TOL; tracks the largest difference."""
    for g, (ref, got) in enumerate(zip(reference.param_groups, candidate.param_groups)):
        pairs = [("lr", ref["lr"], got["lr"])]
        if "betas" in ref:
            pairs += [("beta1", ref["betas"][0], got["betas"][0]), ("beta2", ref["betas"][1], got["betas"][1])]
        for what, expected, actual in pairs:
            diff = rel_diff(expected, actual)
            LARGEST["values"] += 1
            if diff > LARGEST["rel_diff"]:
                LARGEST.update(rel_diff=diff, case=f"{case}, {what} of group {g} after {after} steps")
            assert diff <= REL_TOL, f"{case}: {what} of group {g} after {after} steps: DeepSpeed {expected!r}, ours {actual!r}"


@pytest.mark.parametrize("name,kwargs,steps", CASES, ids=CASE_IDS)
def test_schedule_matches_deepspeed(name, kwargs, steps):
    reference_opt, our_opt = optimizer_pair()
    reference = getattr(ds_schedules, name)(reference_opt, **kwargs)
    ours_sched = getattr(ours, name)(our_opt, **kwargs)
    case = f"{name}({kwargs})"
    compare_groups(reference_opt, our_opt, case, after=0)  # the values set at construction
    for n in range(1, steps + 1):
        reference.step()
        ours_sched.step()
        compare_groups(reference_opt, our_opt, case, after=n)
    assert ours_sched.last_batch_iteration == reference.last_batch_iteration == steps - 1


def test_one_cycle_with_sgd_matches_deepspeed():
    """No betas: both leave momentum alone and cycle only the lr."""
    reference_opt, our_opt = optimizer_pair(lambda groups: torch.optim.SGD(groups, momentum=0.9))
    kwargs = {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 4}
    reference, ours_sched = ds_schedules.OneCycle(reference_opt, **kwargs), ours.OneCycle(our_opt, **kwargs)
    for n in range(12):
        reference.step()
        ours_sched.step()
        compare_groups(reference_opt, our_opt, "OneCycle(SGD)", after=n + 1)
        assert [g["momentum"] for g in our_opt.param_groups] == [g["momentum"] for g in reference_opt.param_groups]


@pytest.mark.parametrize("name,kwargs", [
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 6}),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_num_steps": 6}),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 5, "decay_step_size": 2, "decay_lr_rate": 0.5}),
])
def test_deepspeed_style_resume_from_last_batch_iteration(name, kwargs):
    """Built with last_batch_iteration=k (DeepSpeed's resume argument), both continue alike from k + 1."""
    reference_opt, our_opt = optimizer_pair()
    for opt in (reference_opt, our_opt):
        getattr(ds_schedules, name)(opt, **kwargs)  # the groups as a run that started would have them
    reference = getattr(ds_schedules, name)(reference_opt, last_batch_iteration=11, **kwargs)
    ours_sched = getattr(ours, name)(our_opt, last_batch_iteration=11, **kwargs)
    for n in range(25):
        reference.step()
        ours_sched.step()
        compare_groups(reference_opt, our_opt, f"{name} resumed at 11", after=n + 1)


@pytest.mark.parametrize("name,kwargs", [
    ("WarmupLR", {"warmup_num_steps": 0}),
    ("WarmupLR", {"warmup_num_steps": 2.5}),
    ("WarmupCosineLR", {"total_num_steps": 10, "warmup_num_steps": -1}),
    ("LRRangeTest", {"lr_range_test_step_size": 0}),
    ("LRRangeTest", {"lr_range_test_step_size": 1.5}),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0, "cycle_first_step_size": 0}),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0, "cycle_second_step_size": -1}),
    ("OneCycle", {"cycle_min_lr": [0.1, 0.1], "cycle_max_lr": 1.0}),
    ("WarmupDecayLR", {"total_num_steps": 10, "warmup_max_lr": [0.1]}),
])
def test_rejects_what_deepspeed_rejects(name, kwargs):
    reference_opt, our_opt = optimizer_pair()
    with pytest.raises(ValueError):
        getattr(ds_schedules, name)(reference_opt, **kwargs)
    with pytest.raises(ValueError):
        getattr(ours, name)(our_opt, **kwargs)


def test_unknown_warmup_type_is_an_error_not_deepspeeds_fallback():
    reference_opt, our_opt = optimizer_pair()
    ds_schedules.WarmupLR(reference_opt, warmup_type="cosine")  # DeepSpeed: warns, uses 'log'
    with pytest.raises(ValueError, match="warmup_type='cosine': allowed values: log, linear"):
        ours.WarmupLR(our_opt, warmup_type="cosine")


# -- the public object API: the same values from both, before the first step included ---------------
def api_values(scheduler):
    """What DeepSpeed-style code reads from a schedule object."""
    try:
        last = [float(v) for v in scheduler.get_last_lr()]
    except AssertionError:  # DeepSpeed's OneCycle before its first step: "need to call step() first"
        last = [float(g["lr"]) for g in scheduler.optimizer.param_groups]  # ours returns what it wrote
    values = {
        "get_lr": [float(v) for v in scheduler.get_lr()],
        "get_last_lr": last,
        "last_batch_iteration": scheduler.last_batch_iteration,
        "state_dict[last_batch_iteration]": scheduler.state_dict()["last_batch_iteration"],
    }
    if hasattr(scheduler, "get_mom"):
        values["get_mom"] = scheduler.get_mom()
    if hasattr(scheduler, "get_lr_ratio"):
        values["get_lr_ratio"] = scheduler.get_lr_ratio()
    return values


def assert_same_api_values(reference, candidate, case: str) -> None:
    expected, actual = api_values(reference), api_values(candidate)
    assert expected.keys() == actual.keys(), case
    for key, want in expected.items():
        got = actual[key]
        flat_want, flat_got = _flatten(want), _flatten(got)
        assert len(flat_want) == len(flat_got), f"{case}: {key}: DeepSpeed {want!r}, ours {got!r}"
        for a, b in zip(flat_want, flat_got):
            diff = rel_diff(a, b) if a is not None and b is not None else (0.0 if a is b else 1.0)
            LARGEST["values"] += 1
            LARGEST["rel_diff"] = max(LARGEST["rel_diff"], diff)
            assert diff <= REL_TOL, f"{case}: {key}: DeepSpeed {want!r}, ours {got!r}"


def _flatten(value):
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


API_CASES = [
    ("WarmupLR", {"warmup_num_steps": 5}),
    ("WarmupDecayLR", {"total_num_steps": 12, "warmup_num_steps": 4, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 12, "warmup_num_steps": 4, "warmup_min_ratio": 0.1}),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 4, "decay_step_size": 2,
                  "decay_lr_rate": 0.5, "decay_mom_rate": 0.1}),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 4, "cycle_momentum": False}),
    ("LRRangeTest", {"lr_range_test_step_size": 3, "lr_range_test_staircase": True}),
]


@pytest.mark.parametrize("name,kwargs", API_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(API_CASES)])
def test_public_api_matches_deepspeed(name, kwargs):
    """get_lr, get_last_lr, get_mom, get_lr_ratio, last_batch_iteration and the state_dict key agree with
    DeepSpeed's objects at construction, after every step, after step(last_batch_iteration=k) jumps
    (forwards and back), and after loading each other's state_dict."""
    reference_opt, our_opt = optimizer_pair()
    reference = getattr(ds_schedules, name)(reference_opt, **kwargs)
    candidate = getattr(ours, name)(our_opt, **kwargs)
    assert_same_api_values(reference, candidate, f"{name} at construction")
    for n in range(1, 16):
        reference_opt.step()
        our_opt.step()
        reference.step()
        candidate.step()
        assert_same_api_values(reference, candidate, f"{name} after {n} steps")
        compare_groups(reference_opt, our_opt, name, after=n)
    for jump in (3, 20, 0, 7):
        reference.step(jump)
        candidate.step(last_batch_iteration=jump)
        assert_same_api_values(reference, candidate, f"{name} after step({jump})")
        compare_groups(reference_opt, our_opt, f"{name} step({jump})", after=jump + 1)

    # DeepSpeed's state_dict is {'last_batch_iteration': n}; ours carries that key and loads theirs
    assert reference.state_dict() == {"last_batch_iteration": 7}
    assert candidate.state_dict()["last_batch_iteration"] == 7
    reference.step()
    candidate.load_state_dict(reference.state_dict())  # a DeepSpeed checkpoint's schedule state
    assert candidate.last_batch_iteration == 8
    reference.step()
    candidate.step()
    assert_same_api_values(reference, candidate, f"{name} after loading DeepSpeed's state")
    reference.load_state_dict(candidate.state_dict())  # and DeepSpeed reads ours
    assert reference.last_batch_iteration == candidate.last_batch_iteration == 9
    candidate.last_batch_iteration = 2  # a settable counter, as in DeepSpeed
    reference.last_batch_iteration = 2
    assert_same_api_values(reference, candidate, f"{name} after setting last_batch_iteration")


# -- deepspeed.initialize with our callables --------------------------------------------------------
@pytest.fixture
def single_process_group(monkeypatch, tmp_path):
    """A 1-process gloo group (DeepSpeed requires torch.distributed even for one process)."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    if not dist.is_initialized():
        store = tempfile.mktemp(dir=tmp_path)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield


@pytest.mark.slow  # ~6 s, and on CPU DeepSpeed JIT-compiles its shared-memory comm op on first use
def test_deepspeed_initialize_accepts_our_callables(single_process_group):
    """deepspeed.initialize takes the config's optimizer and scheduler callables and applies our lrs."""
    import deepspeed

    from conftest import compose
    from ds_hydra.models.build import build_model
    from ds_hydra.optim.build import optimizer_callable, param_groups_for, scheduler_callable
    from ds_hydra.models.contract import CausalLMLoss

    cfg = compose(["model=gpt_tiny", "optimizer=adamw", "scheduler=warmup_cosine_lr", "trainer.max_steps=12",
                   "scheduler.warmup_num_steps=3", "param_groups.lr_rules=[{pattern:'^wte',lr_mult:0.5}]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 65)
    groups = param_groups_for(model, cfg.optimizer, cfg.param_groups)
    base_lrs = [g.get("lr", cfg.optimizer.lr) for g in groups]  # before the optimizer and scheduler own the dicts
    assert base_lrs == [1e-3, 1e-3, 5e-4]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer_callable(cfg.optimizer),
        lr_scheduler=scheduler_callable(cfg.scheduler),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2},
    )
    assert isinstance(scheduler, ours.WarmupCosineLR) and isinstance(optimizer, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "decay/lr_rules[0]"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.1]

    # DeepSpeed's own WarmupCosineLR over an optimizer with the same group lrs is the reference.
    ref_opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs])
    reference = ds_schedules.WarmupCosineLR(ref_opt, total_num_steps=12, warmup_num_steps=3, cos_min_ratio=0.0001)
    x = torch.randint(0, 65, (2, 16))
    for step in range(14):
        assert engine.get_lr() == pytest.approx([g["lr"] for g in ref_opt.param_groups], rel=REL_TOL, abs=0)
        loss = CausalLMLoss()(engine(x), x)
        engine.backward(loss)
        engine.step()  # optimizer step, then our scheduler's step
        reference.step()
    assert scheduler.last_batch_iteration == 13
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 1e-4, 1e-3 * 1e-4, 5e-4 * 1e-4], rel=1e-12)
