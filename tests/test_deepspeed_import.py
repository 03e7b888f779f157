"""``deepspeed_config=<ds_config.json>`` and ``task=import_deepspeed``: DeepSpeed JSON configs run as they are.

Real-shaped configs live in ``tests/deepspeed_configs/`` (ZeRO 1, 2 and 3, fp16 with loss scaling, bf16,
Hugging Face's "auto" template, the five schedules, activation checkpointing); each one imports, trains
a few steps on the CPU, and round-trips through ``task=export_deepspeed``. Broken ones
(``tests/deepspeed_configs/bad/``) fail in one line with exit code 2.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, cli_in_process, compose, run_cli
from ds_hydra.deepspeed.json_import import (
    OPTIMIZER_DEFAULTS,
    SCHEDULER_DEFAULTS,
    Imported,
    hydra_value,
    import_deepspeed_config,
    read_deepspeed_json,
)
from ds_hydra.errors import ConfigError, UserError

CONFIGS = REPO / "tests" / "deepspeed_configs"
GOOD = sorted(CONFIGS.glob("*.json"))
NAMES = [p.stem for p in GOOD]
# A few steps on the CPU; the batch comes from the file, and so does the run length when its schedule has
# total_num_steps (run_length adds trainer.max_steps for the others).
RUN = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.batch_size"))] + ["trainer.eval_interval=0"]


def run_length(config: dict):
    total = (config.get("scheduler") or {}).get("params", {}).get("total_num_steps")
    return [] if isinstance(total, int) else ["trainer.max_steps=6"]


def load(name: str) -> dict:
    return read_deepspeed_json(CONFIGS / f"{name}.json")


def imported(config, *command_line, world_size=1, deepspeed_available=True) -> Imported:
    return import_deepspeed_config(config, "ds.json", world_size=world_size, deepspeed_available=deepspeed_available,
                                   command_line=command_line)


def values(result: Imported) -> dict:
    return {o.key: o.value for o in result.overrides}


def compose_imported(result: Imported, *command_line):
    return compose([*result.override_texts, *command_line])


# -- every config: imports, composes, trains, round-trips -----------------------------------------------
def leaf_paths(config, prefix=""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, path + ".")
        else:
            yield path


@pytest.mark.parametrize("name", NAMES)
def test_every_key_is_mapped_left_to_ds_hydra_or_listed(name):
    """None silently: each key of the file gives an override, is "auto", chose something, or is listed as ignored."""
    result = imported(load(name))
    accounted = {o.source for o in result.overrides} | set(result.auto) | set(result.ignored) | set(result.consumed)
    unaccounted = [p for p in leaf_paths(load(name))
                   if not any(p == a or p.startswith(a + ".") for a in accounted)]
    assert unaccounted == []


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("deepspeed_available", [True, False], ids=["deepspeed", "native"])
def test_imported_config_composes_and_validates(name, deepspeed_available):
    from ds_hydra.instantiate import signature_problems
    from ds_hydra.validation import config_problems

    result = imported(load(name), deepspeed_available=deepspeed_available)
    cfg = compose_imported(result, *RUN, *run_length(load(name)), "trainer.precision=bf16")
    assert config_problems(cfg) == [] and signature_problems(cfg) == []
    engine = cfg.engine.name.value
    zero = load(name).get("zero_optimization")
    if zero is None:
        assert engine == "auto"
    elif deepspeed_available:
        assert engine == "deepspeed" and cfg.engine.zero_stage == zero["stage"]
    else:
        assert engine == {0: "auto", 1: "ddp", 2: "ddp", 3: "fsdp"}[zero["stage"]]


def train_steps(result: Imported, tmp_path: Path, *command_line):
    from ds_hydra.training.trainer import train

    cfg = compose_imported(result, *RUN, *command_line)
    metrics = train(cfg, run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return cfg, metrics, records


# Every config composes and validates above; two of them train in the default run, all of them with -m slow.
TRAINED_BY_DEFAULT = ("zero1_bf16_warmup_lr", "hf_trainer_auto")


@pytest.mark.parametrize("name", [n if n in TRAINED_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_each_config_trains_a_few_steps_on_the_cpu(name, tmp_path):
    """Without DeepSpeed's engine (the native engine the import falls back to): DeepSpeed's engine on the
    CPU is the slow test below. fp16 needs CUDA, so the fp16 config runs with trainer.precision=bf16."""
    config = load(name)
    result = imported(config, deepspeed_available=False)
    if "engine=fsdp" in result.override_texts:  # ZeRO 3 without DeepSpeed: FSDP2
        from ds_hydra.engine.fsdp import fsdp_unsupported

        if fsdp_unsupported(torch.device("cpu")):
            pytest.skip(fsdp_unsupported(torch.device("cpu")))
    fp16 = (config.get("fp16") or {}).get("enabled") is True
    cfg, metrics, records = train_steps(result, tmp_path, *run_length(config), *(["trainer.precision=bf16"] if fp16 else []))
    assert metrics["step"] == cfg.trainer.max_steps
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < 4.3  # ln(65) = 4.17 at the start
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs and all(lr >= 0 for lr in lrs)
    scheduler = (config.get("scheduler") or {}).get("params", {})
    if "total_num_steps" in scheduler and scheduler["total_num_steps"] != "auto":
        assert cfg.trainer.max_steps == scheduler["total_num_steps"]


def round_trip_comparable(original: dict, exported: dict, path=""):
    """(path, original value, exported value) for every key both have, "auto" and type names aside."""
    for key, value in original.items():
        where = f"{path}{key}"
        if key not in exported or value == "auto":
            continue
        if isinstance(value, dict) and isinstance(exported[key], dict):
            yield from round_trip_comparable(value, exported[key], where + ".")
        else:
            yield where, value, exported[key]


def normalized_optimizer(section):
    """DeepSpeed's meaning of an optimizer section: Adam is AdamW unless adam_w_mode is false."""
    section = copy.deepcopy(section)
    name = section["type"].lower()
    params = section.setdefault("params", {})
    if name in ("adam", "adamw"):
        decoupled = name == "adamw" or params.pop("adam_w_mode", True)
        section["type"] = "adamw" if decoupled else "adam"
        params.pop("adam_w_mode", None)
    else:
        section["type"] = name
    return section


@pytest.mark.parametrize("name", NAMES)
def test_import_then_export_gives_back_every_shared_key(name, tmp_path):
    from ds_hydra.deepspeed.json_export import deepspeed_config

    original = load(name)
    cfg = compose_imported(imported(original), "engine=deepspeed", "model=gpt_tiny")
    precision = cfg.trainer.precision.value
    exported = deepspeed_config(cfg, world_size=1, precision="fp32" if precision == "auto" else precision, for_file=True)
    if "optimizer" in original:
        original = {**original, "optimizer": normalized_optimizer(original["optimizer"])}
        exported = {**exported, "optimizer": normalized_optimizer(exported["optimizer"])}
    compared = list(round_trip_comparable(original, exported))
    differ = [(p, a, b) for p, a, b in compared if a != b]
    assert differ == []
    assert len(compared) >= 8  # the batch, clipping, precision, ZeRO and schedule keys at least


# -- the batch triple ---------------------------------------------------------------------------------
@pytest.mark.parametrize("given,world,micro,accum", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 1, 4, 8),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 4, 4, 2),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, 4, 2),
    ({"train_batch_size": 32}, 8, 4, 1),  # DeepSpeed: no accumulation, the total split over the ranks
    ({"train_micro_batch_size_per_gpu": 6}, 2, 6, 1),
    ({"train_batch_size": 48, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4}, 4, 3, 4),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 3}, 1, None, 3),
])
def test_batch_triple_derives_the_missing_one(given, world, micro, accum):
    got = values(imported(given, world_size=world))
    assert got.get("trainer.batch_size") == micro and got.get("trainer.grad_accum_steps") == accum


@pytest.mark.parametrize("given,world,message", [
    ({"train_batch_size": 60, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}, 1,
     "train_batch_size=60 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 8 x world size 1 = 32"),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}, 1,
     "train_batch_size=64 = train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 8 x 2 ranks: written for "
     "world size 2, but this run has 1; launch it on 2 ranks (hydra/launcher=torchrun hydra.launcher.nproc_per_node=2, "
     "or torchrun --nproc_per_node=2), or drop one of the three to derive it for 1"),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}, 4,
     "written for world size 2, but this run has 4"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 1,
     "train_batch_size=30 is not divisible by train_micro_batch_size_per_gpu 4 x world size 1 = 4 "
     "(gradient_accumulation_steps would be 7.5)"),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 3}, 2,
     "not divisible by gradient_accumulation_steps 3 x world size 2 = 6"),
    ({"train_batch_size": 0}, 1, "train_batch_size=0: must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": 2.5}, 1, "train_micro_batch_size_per_gpu=2.5: must be a positive integer"),
])
def test_inconsistent_or_indivisible_triple_is_refused_with_the_arithmetic(given, world, message):
    with pytest.raises(ConfigError) as info:
        imported(given, world_size=world)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("deepspeed_config=ds.json: ") and message in info.value.problems[0]


def test_command_line_batch_settings_win_and_the_total_derives_the_other():
    config = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}
    assert values(imported(config, "trainer.batch_size=8")).get("trainer.grad_accum_steps") == 4
    assert values(imported(config, "trainer.grad_accum_steps=2")).get("trainer.batch_size") == 16
    both = imported(config, "trainer.batch_size=2", "trainer.grad_accum_steps=2")
    assert "trainer.batch_size" not in values(both) and "trainer.grad_accum_steps" not in values(both)
    assert any("train_batch_size=32 gives way to the command line" in n for n in both.notes)


# -- the optimizer --------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,option", [
    ({"type": "Adam"}, "adamw"),  # DeepSpeed's Adam is AdamW unless told otherwise
    ({"type": "Adam", "params": {"adam_w_mode": False}}, "adam"),
    ({"type": "adamw"}, "adamw"),
    ({"type": "AdaGrad"}, "adagrad"),
    ({"type": "SGD", "params": {"momentum": 0.9}}, "sgd"),
    ({"type": "RMSprop"}, "rmsprop"),
    ({"type": "NAdam"}, "nadam"),
    ({"type": "RAdam"}, "radam"),
    ({"type": "Adamax"}, "adamax"),
])
def test_optimizer_types_map_with_deepspeeds_defaults(section, option):
    got = values(imported({"optimizer": section}))
    assert got["optimizer"] == option
    for key, default in OPTIMIZER_DEFAULTS[option].items():
        assert got[f"optimizer.{key}"] == section.get("params", {}).get(key, default)


@pytest.mark.parametrize("type_", ["Lamb", "OneBitAdam", "ZeroOneAdam", "Lion", "Adadelta", None])
def test_optimizer_without_torch_equivalent_is_refused_naming_the_allowed_types(type_):
    with pytest.raises(ConfigError, match=r"optimizer.type=.*allowed types: Adam, AdamW, Adagrad .* SGD, RMSprop, "
                                          r"Adamax, NAdam, RAdam .*Lamb, OneBitAdam.*have no torch equivalent"):
        imported({"optimizer": {"type": type_, "params": {}}})


def test_optimizer_params_are_checked_against_the_torch_class():
    with pytest.raises(ConfigError) as info:
        imported({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas1": 0.9, "max_grad_norm": 1.0,
                                                            "bias_correction": False}}})
    adamw_arguments = [name for name in inspect.signature(torch.optim.AdamW).parameters if name != "params"]
    assert info.value.problems == [
        "deepspeed_config=ds.json: optimizer.params.betas1: torch.optim.AdamW has no argument 'betas1' (did you mean "
        f"'betas'?); allowed: {', '.join(adamw_arguments)}",
        "deepspeed_config=ds.json: optimizer.params.max_grad_norm: DeepSpeed refuses it; clip with gradient_clipping instead",
        "deepspeed_config=ds.json: optimizer.params.bias_correction=false: torch's Adam always corrects the moment "
        "bias; no equivalent",
    ]


def test_deepspeeds_adam_builds_the_same_update_as_the_imported_optimizer():
    """DeepSpeed's Adam (adam_w_mode on) is torch's AdamW: one step of each from the same state agrees."""
    torch = pytest.importorskip("torch")
    from ds_hydra.instantiate import instantiate

    cfg = compose_imported(imported({"optimizer": {"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.5}}}))
    weight = torch.nn.Parameter(torch.ones(3))
    reference = torch.nn.Parameter(torch.ones(3))
    ours = instantiate(cfg.optimizer)([weight])
    adamw = torch.optim.AdamW([reference], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)
    for p, opt in ((weight, ours), (reference, adamw)):
        p.grad = torch.tensor([1.0, -2.0, 3.0])
        opt.step()
    assert torch.equal(weight, reference)


# -- the scheduler and its foot-guns ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULER_DEFAULTS))
def test_schedule_params_left_out_take_deepspeeds_defaults(name):
    params = {"total_num_steps": 50} if name in ("WarmupDecayLR", "WarmupCosineLR") else {}
    if name == "OneCycle":
        params = {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}
    got = values(imported({"scheduler": {"type": name, "params": params}}))
    for key, default in SCHEDULER_DEFAULTS[name].items():
        assert got[f"scheduler.{key}"] == default


def test_total_num_steps_counts_optimizer_steps_and_sets_the_run_length():
    """DeepSpeed #633: optimizer steps, the unit of trainer.max_steps, whatever the accumulation or world."""
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
              "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 300, "warmup_num_steps": 30}}}
    result = imported(config, world_size=4)
    assert values(result)["trainer.max_steps"] == 300 and values(result)["trainer.grad_accum_steps"] == 4
    assert any("counts optimizer steps" in n for n in result.notes)
    shorter = imported(config, "trainer.max_steps=500", world_size=4)
    assert "trainer.max_steps" not in values(shorter)
    assert any("ends before the run does, then holds its floor" in n for n in shorter.notes)
    cfg = compose_imported(imported(config), "model=gpt_tiny")
    assert cfg.trainer.max_steps == cfg.scheduler.total_num_steps == 300


def test_auto_values_are_left_to_ds_hydra_and_listed():
    result = imported(load("hf_trainer_auto"))
    assert set(result.auto) == {
        "fp16.enabled", "bf16.enabled", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
        "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr",
        "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps", "zero_optimization.reduce_bucket_size",
        "gradient_accumulation_steps", "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
    }
    default = compose(["model=gpt_tiny", "optimizer=adamw", "scheduler=warmup_decay_lr", "trainer.max_steps=40"])
    cfg = compose_imported(result, "model=gpt_tiny", "trainer.max_steps=40")
    for key in ("optimizer.lr", "optimizer.betas", "optimizer.weight_decay", "scheduler.warmup_num_steps",
                "scheduler.total_num_steps", "trainer.batch_size", "trainer.grad_clip", "trainer.precision"):
        assert _select(cfg, key) == _select(default, key), key  # ds_hydra's default and derivations
    assert cfg.scheduler.total_num_steps == 40 and cfg.scheduler.warmup_num_steps == 2  # the run's, 5% of it
    assert not any(o.key.endswith("reduce_bucket_size") for o in result.overrides)
    line = next(line for line in result.log_lines() if '"auto", left to' in line)
    assert "optimizer.params.lr" in line and "train_batch_size" in line


def _select(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def test_warmup_of_zero_steps_is_refused_with_what_to_do_instead():
    """DeepSpeed #771/#4688: log(0) or 1/log(1) once; DeepSpeed 0.19.8 raises. Here: one clear line."""
    with pytest.raises(ConfigError, match=r"scheduler.params.warmup_num_steps=0: DeepSpeed's schedules warm up over "
                                          r"at least 2 steps .*for no warmup set warmup_min_lr to the peak lr"):
        imported({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}})


def test_warmup_of_one_step_is_two_as_in_deepspeed_and_says_so():
    torch = pytest.importorskip("torch")
    from ds_hydra.optim.build import build_scheduler

    config = {"optimizer": {"type": "SGD", "params": {"lr": 0.5}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1, "warmup_min_lr": 0.1}}}
    result = imported(config)
    assert any("warmup_num_steps=1: DeepSpeed warms up over 2 steps" in n for n in result.notes)
    cfg = compose_imported(result, "model=gpt_tiny", "trainer.max_steps=10")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_scheduler(cfg.scheduler, optimizer)
    lrs = []
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [0.1, 0.5, 0.5]  # iteration 0 at warmup_min_lr, the peak from iteration 1 on


def test_unknown_warmup_type_and_torch_schedulers_are_refused():
    with pytest.raises(ConfigError) as info:
        imported({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine", "warmup_steps": 5}}})
    assert info.value.problems[0].endswith("warmup_type='cosine': allowed values: log, linear (DeepSpeed would "
                                           "silently use log)")
    assert "scheduler.params.warmup_steps: WarmupLR has no argument 'warmup_steps'" in info.value.problems[1]
    with pytest.raises(ConfigError, match="scheduler.type='StepLR': allowed types: WarmupLR, WarmupDecayLR, "
                                          "WarmupCosineLR, OneCycle, LRRangeTest"):
        imported({"scheduler": {"type": "StepLR", "params": {"step_size": 10}}})


# DeepSpeed's TestGetLrBeforeTrain configs (optimizer Adam lr 0.00015), through the import: the schedule
# ds_hydra builds from the file gives DeepSpeed's lrs at construction and for 30 steps.
DEEPSPEED_TEST_SCHEDULES = [
    ("WarmupLR", {}),
    ("WarmupDecayLR", {"warmup_num_steps": 10, "total_num_steps": 20}),
    ("WarmupCosineLR", {"warmup_num_steps": 10, "total_num_steps": 20}),
    ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 0.1}),
    ("LRRangeTest", {}),
]


@pytest.mark.parametrize("name,params", DEEPSPEED_TEST_SCHEDULES, ids=[n for n, _ in DEEPSPEED_TEST_SCHEDULES])
def test_file_schedules_equal_deepspeeds_objects(name, params, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    from ds_hydra.optim.build import build_scheduler

    config = {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
              "scheduler": {"type": name, "params": params}, "gradient_clipping": 1.0}
    cfg = compose_imported(imported(config), "model=gpt_tiny", "trainer.max_steps=2000")
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.00015)
    ours = build_scheduler(cfg.scheduler, ours_opt)
    reference = getattr(ds_schedules, name)(ref_opt, **params)
    for _ in range(30):
        assert ours.get_lr() == pytest.approx(reference.get_lr(), rel=1e-12, abs=0)
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=0)
        ours_opt.step()
        ref_opt.step()
        ours.step()
        reference.step()


# -- precision, clipping, ZeRO, activation checkpointing ----------------------------------------------
@pytest.mark.parametrize("config,precision", [
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"bfloat16": {"enabled": True}}, "bf16"),  # DeepSpeed's old name
    ({"fp16": {"enabled": False}, "bf16": {"enabled": False}}, "fp32"),
    ({}, "fp32"),  # DeepSpeed trains in fp32 unless told otherwise
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "bf16"),
    ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, None),  # ds_hydra's auto
])
def test_precision(config, precision):
    assert values(imported(config)).get("trainer.precision") == precision


def test_fp16_and_bf16_together_are_refused():
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        imported({"fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_fp16_loss_scaling_goes_to_deepspeeds_engine_or_is_explained():
    config = load("zero2_fp16_warmup_decay")
    got = values(imported(config))
    assert got["engine.extra.fp16.initial_scale_power"] == 16 and got["engine.extra.fp16.hysteresis"] == 2
    native = imported(config, deepspeed_available=False)
    assert "torch's GradScaler" in native.ignored["fp16.loss_scale_window"]
    assert not any(k.startswith("engine.extra") for k in values(native))


def test_gradient_clipping():
    assert values(imported({"gradient_clipping": 0.5}))["trainer.grad_clip"] == 0.5
    assert values(imported({}))["trainer.grad_clip"] == 0.0  # DeepSpeed does not clip by default
    with pytest.raises(ConfigError, match=r"gradient_clipping=-1.0: must be a number >= 0 \(0 disables clipping\)"):
        imported({"gradient_clipping": -1.0})


@pytest.mark.parametrize("stage,native", [(0, "auto"), (1, "ddp"), (2, "ddp"), (3, "fsdp")])
def test_zero_stage_without_deepspeed_takes_the_nearest_native_engine(stage, native):
    result = imported({"zero_optimization": {"stage": stage, "offload_param": {"device": "cpu"}}},
                      deepspeed_available=False)
    assert values(result).get("engine", "auto") == native
    assert [n for n in result.notes if n.startswith("DeepSpeed is not installed")] == [
        next(n for n in result.notes if f"zero_optimization.stage={stage} runs on engine={native}" in n)]
    if stage == 3:
        assert values(result)["engine.cpu_offload"] is True
    with_deepspeed = values(imported({"zero_optimization": {"stage": stage}}))
    assert with_deepspeed["engine"] == "deepspeed" and with_deepspeed["engine.zero_stage"] == stage


def test_zero_settings_deepspeed_reads_pass_through_and_reach_its_config():
    from ds_hydra.deepspeed.json_export import deepspeed_config

    config = load("zero3_bf16_warmup_cosine")
    cfg = compose_imported(imported(config), "model=gpt_tiny")
    built = deepspeed_config(cfg, world_size=1, precision="bf16")
    for key, value in config["zero_optimization"].items():
        assert built["zero_optimization"][key] == value, key
    assert built["steps_per_print"] > 10**9  # training keeps DeepSpeed's own prints off


def test_activation_checkpointing_keys_map_to_ckpt():
    config = load("one_cycle_activation_checkpointing")
    got = values(imported(config))
    for key, value in config["activation_checkpointing"].items():
        assert got[f"ckpt.{key}"] == value
    odd = imported({"activation_checkpointing": {"partitioned_activations": True}})  # DeepSpeed's own doc typo
    assert odd.ignored["activation_checkpointing.partitioned_activations"].endswith("did you mean 'partition_activations'?")


def test_unknown_and_unused_keys_are_listed_in_one_line_with_why():
    config = {"train_batch_size": 8, "gradient_clippng": 1.0, "tensorboard": {"enabled": True}, "amp": {"enabled": False},
              "pipeline": {"stages": 2}, "wall_clock_breakdown": True, "zero_optimization": {"stage": 1}}
    result = imported(config)
    lines = [line for line in result.log_lines() if "no meaning here, ignored" in line]
    assert len(lines) == 1
    assert "gradient_clippng (not a DeepSpeed key, which DeepSpeed ignores too; did you mean 'gradient_clipping'?)" in lines[0]
    assert "tensorboard (DeepSpeed's metric writer" in lines[0] and "amp (Apex AMP" in lines[0]
    assert "pipeline (pipeline parallelism" in lines[0] and "wall_clock_breakdown" not in lines[0]
    assert values(result)["engine.extra.wall_clock_breakdown"] is True  # DeepSpeed's engine reads it


# -- the command line wins ----------------------------------------------------------------------------
def test_command_line_overrides_win():
    config = load("zero1_bf16_warmup_lr")
    result = imported(config, "optimizer.lr=0.01", "scheduler=cosine", "engine.zero_stage=2")
    got = values(result)
    assert "optimizer.lr" not in got and got["optimizer"] == "adamw"
    assert not any(k.startswith("scheduler") for k in got)  # another schedule: none of the file's params
    assert "engine.zero_stage" not in got and got["engine"] == "deepspeed"
    assert {o.key for o in result.overridden} >= {"optimizer.lr", "scheduler", "scheduler.warmup_num_steps",
                                                  "engine.zero_stage"}
    cfg = compose_imported(result, "model=gpt_tiny", "optimizer.lr=0.01", "scheduler=cosine", "engine.zero_stage=2")
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.betas == [0.9, 0.95] and cfg.engine.zero_stage == 2
    same_choice = values(imported(config, "optimizer=adamw"))
    assert same_choice["optimizer.betas"] == [0.9, 0.95]  # the same option keeps the file's params


@pytest.mark.parametrize("value,text", [
    (None, "null"), (True, "true"), (3, "3"), (1e-05, "1e-05"), (5e8, "500000000.0"), ("cpu", "cpu"),
    ("/nvme/x y", "'/nvme/x y'"), ([0.9, 0.95], "[0.9,0.95]"), ({"enabled": True, "path": "a b"}, "{enabled:true,path:'a b'}"),
    ("auto", "'auto'"),
])
def test_hydra_value(value, text):
    assert hydra_value(value) == text


# -- through the command line ----------------------------------------------------------------------------
def cli(tmp_path, config: Path, *args):
    return run_cli([*RUN, *run_length(read_deepspeed_json(config)), f"hydra.run.dir={tmp_path / 'run'}",
                    f"deepspeed_config={config}", *args])


def test_cli_trains_a_deepspeed_config_and_logs_what_it_did(tmp_path):
    proc = cli(tmp_path, CONFIGS / "lr_range_test_sgd.json", "optimizer.momentum=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert "momentum: 0.5" in resolved and "lr_range_test_step_size: 2" in resolved
    assert "deepspeed_config: " in resolved
    log = (tmp_path / "run" / "ds_hydra.log").read_text()
    assert "trainer.grad_accum_steps=2" in log
    assert "the command line replaces optimizer.momentum (file: 0.9)" in log
    assert log.count("no meaning here, ignored: tensorboard (") == 1


@pytest.mark.parametrize("bad,message", [
    ("not_json.json", "not valid JSON"),  # "or hjson (line 4, column 1: ...)" where hjson is installed
    ("unknown_optimizer.json", "optimizer.type='Lamb': allowed types: Adam, AdamW, Adagrad"),
    ("inconsistent_batch.json", "train_batch_size=64 = train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps "
                                "8 x 2 ranks: written for world size 2, but this run has 1"),
    ("negative_clipping.json", "gradient_clipping=-1.0: must be a number >= 0"),
    ("missing.json", "no such file"),
    ("odd_key.json", "key 'zero_optimization.x,y:{a:1},z' cannot be passed on"),
])
def test_bad_files_fail_in_one_line_with_exit_2(tmp_path, bad, message):
    if bad == "odd_key.json":
        pytest.importorskip("hjson", reason="the file is read as DeepSpeed reads it, with hjson")
    proc = cli_in_process(["model=gpt_tiny", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}",
                           f"deepspeed_config=tests/deepspeed_configs/bad/{bad}"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ds_hydra: error: deepspeed_config=tests/deepspeed_configs/bad/{bad}")
    assert message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_import_task_writes_an_experiment_that_composes_to_the_same_config(tmp_path):
    """task=import_deepspeed: the preset in the run dir, run by the command in its header, composes the
    config that deepspeed_config=<file> composes."""
    pytest.importorskip("deepspeed", reason="ZeRO 2 keeps its fp16 loss-scaling keys only for DeepSpeed's engine")
    source = CONFIGS / "zero2_fp16_warmup_decay.json"
    extra = ["model=gpt_tiny", "trainer.precision=bf16"]
    proc = run_cli(["task=import_deepspeed", f"deepspeed_config={source}", *extra, f"hydra.run.dir={tmp_path / 'imp'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = tmp_path / "imp" / "experiment" / "zero2_fp16_warmup_decay.yaml"
    text = experiment.read_text()
    header = text.splitlines()
    assert header[0] == "# @package _global_"
    command = header[2].lstrip("# ")
    assert command.startswith("python -m ds_hydra --config-dir") and "experiment=zero2_fp16_warmup_decay" in command
    assert "model=gpt_tiny trainer.precision=bf16" in command
    assert "  - override /optimizer: adamw  # optimizer.type" in text
    assert "initial_scale_power: 16  # fp16.initial_scale_power" in text
    assert "trainer.grad_accum_steps=2" in proc.stdout and "engine.zero_stage=2" in proc.stdout

    via_experiment = run_cli(["--cfg", "job", *shlex.split(command)[3:]])  # the header's command, composing only
    via_file = run_cli(["--cfg", "job", f"deepspeed_config={source}", *extra])
    assert via_experiment.returncode == 0 and via_file.returncode == 0, via_experiment.stderr[-2000:] + via_file.stderr[-2000:]
    strip = lambda out: [l for l in out.splitlines() if not l.startswith(("deepspeed_config:", "experiment:"))]  # noqa: E731
    assert strip(via_experiment.stdout) == strip(via_file.stdout)


# -- DeepSpeed's own engine on the CPU (its first use JIT-builds a C++ op: slow) ------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1_bf16_warmup_lr", "zero2_fp16_warmup_decay", "zero3_bf16_warmup_cosine",
                                  "one_cycle_activation_checkpointing"])
def test_cli_trains_each_zero_config_with_deepspeeds_engine(tmp_path, name):
    pytest.importorskip("deepspeed")
    proc = cli(tmp_path, CONFIGS / f"{name}.json", "trainer.precision=bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "ds_hydra.log").read_text()
    stage = load(name)["zero_optimization"]["stage"]
    assert f"deepspeed: ZeRO stage {stage}" in log
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(final["val_loss"]) and final["val_loss"] < 4.3


# -- the other way round: ds_hydra's config -> export -> import gives ds_hydra's config back ------------
def optimizer_arguments(node: dict) -> dict:
    """Every argument an optimizer node gives its class: its keys, else the class's defaults."""
    from ds_hydra.instantiate import locate_target

    defaults = {n: p.default for n, p in inspect.signature(locate_target(node["_target_"])).parameters.items() if n != "params"}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in node.items()}
    return {**defaults, **given}


@pytest.mark.parametrize("overrides", [
    ["optimizer=adam", "optimizer.weight_decay=0.01", "scheduler=warmup_lr"],  # Adam, not AdamW: adam_w_mode false
    ["optimizer=adamw", "optimizer.amsgrad=true", "scheduler=warmup_decay_lr"],  # torch_adam: the fused kernel has no AMSGrad
    ["optimizer=sgd", "optimizer.nesterov=true", "scheduler=one_cycle", "trainer.grad_accum_steps=3"],
    ["optimizer=rmsprop", "scheduler=lr_range_test", "trainer.precision=bf16", "ckpt.segments=2", "ckpt.profile=true"],
    ["optimizer=nadam", "scheduler=warmup_cosine_lr", "engine.zero_stage=3", "engine.offload_param=cpu",
     "engine.offload_optimizer=cpu", "trainer.grad_clip=0"],
])
def test_export_then_import_gives_the_same_config(overrides, tmp_path):
    from omegaconf import OmegaConf

    from ds_hydra.deepspeed.json_export import deepspeed_config

    base = ["model=gpt_tiny", "engine=deepspeed", "trainer.max_steps=40", *overrides]
    cfg = compose(base)
    precision = cfg.trainer.precision.value
    exported = deepspeed_config(cfg, world_size=1, precision="fp32" if precision == "auto" else precision, for_file=True)
    back = compose_imported(imported(json.loads(json.dumps(exported))), "model=gpt_tiny")
    for key in ("optimizer", "scheduler", "trainer.batch_size", "trainer.grad_accum_steps", "trainer.grad_clip",
                "trainer.log_interval", "engine.zero_stage", "engine.offload_param", "engine.offload_optimizer",
                "ckpt.number_checkpoints", "ckpt.profile"):
        want, got = _select(cfg, key), _select(back, key)
        if key == "ckpt.number_checkpoints":
            want = cfg.ckpt.number_checkpoints or cfg.ckpt.segments or None
        want = OmegaConf.to_container(want, resolve=True) if OmegaConf.is_config(want) else want
        got = OmegaConf.to_container(got, resolve=True) if OmegaConf.is_config(got) else got
        if key == "optimizer":  # what the optimizer class gets: keys left out take its defaults
            want, got = optimizer_arguments(want), optimizer_arguments(got)
        assert got == want, key


COMMENTED = """{
  // DeepSpeed reads its configs with hjson: comments and trailing commas are fine
  "train_batch_size": 8, /* global */
  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1,},},
}
"""


def test_a_config_with_comments_reads_as_deepspeed_reads_it(tmp_path):
    hjson = pytest.importorskip("hjson", reason="DeepSpeed's own JSON reader (installed with DeepSpeed)")
    path = tmp_path / "ds.json"
    path.write_text(COMMENTED)
    config = read_deepspeed_json(path)
    assert config == json.loads(json.dumps(hjson.loads(COMMENTED)))  # what DeepSpeed's hjson.load gives
    assert config == {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}}
    assert import_deepspeed_config(config).override_texts == import_deepspeed_config(
        {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}}).override_texts
    path.write_text('{"train_batch_size": 8, // twice\n "train_batch_size": 4}')
    with pytest.raises(UserError, match="key 'train_batch_size' appears twice"):
        read_deepspeed_json(path)
    path.write_text('{"train_batch_size": 8')
    with pytest.raises(UserError, match=r"ds.json: not valid JSON or hjson \(line 1, "):
        read_deepspeed_json(path)


def test_without_hjson_a_commented_config_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hjson", None)  # import hjson raises ImportError
    path = tmp_path / "ds.json"
    path.write_text(COMMENTED)
    with pytest.raises(UserError) as err:
        read_deepspeed_json(path)
    assert str(err.value) == (f"deepspeed_config={path}: not valid JSON (line 2, column 3: Expecting property name "
                              "enclosed in double quotes); DeepSpeed reads its configs with hjson, which allows "
                              "comments: pip install hjson")


def test_a_key_the_override_grammar_cannot_carry_is_named_with_its_file():
    config = {"train_batch_size": 8, "x,y:{a:1},z": 3,
              "zero_optimization": {"stage": 1, "x,y:{a:1},z": 2, "offload_optimizer": {"device": "none", "a b": 1}}}
    with pytest.raises(ConfigError) as err:
        import_deepspeed_config(config, "ds.json", deepspeed_available=True)
    why = "cannot be passed on: DeepSpeed's keys are names (letters, digits, _ and -); rename or remove it"
    assert err.value.problems == [f"deepspeed_config=ds.json: key 'zero_optimization.x,y:{{a:1}},z' {why}",
                                  f"deepspeed_config=ds.json: key 'zero_optimization.offload_optimizer.a b' {why}"]
    del config["zero_optimization"]["x,y:{a:1},z"], config["zero_optimization"]["offload_optimizer"]["a b"]
    imported = import_deepspeed_config(config, "ds.json", deepspeed_available=True)  # the top-level key is ignored,
    assert "x,y:{a:1},z" in imported.ignored  # as DeepSpeed ignores keys it does not know
