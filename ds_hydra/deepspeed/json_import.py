"""``deepspeed_config=<ds_config.json>``: a DeepSpeed JSON config as ds_hydra overrides (torch-free).

``python -m ds_hydra deepspeed_config=ds_config.json model=...`` reads the file before Hydra composes
(``ds_hydra.deepspeed.command_line``, called by the CLI like ``resume=``) and puts the overrides it maps to
first, the command line's own after them, so the command line wins: an override of a key, or of a
group (``optimizer=sgd``), drops what the file set there. ``task=import_deepspeed`` writes the same
overrides as an ``experiment`` preset into the run dir (``ds_hydra.deepspeed.import_task``) and prints
them. This module reads the file and maps it; the tables it maps with are ``ds_hydra.deepspeed.keys``.

What maps (DeepSpeed 0.19.8's keys; a key the file leaves out takes DeepSpeed's default, as DeepSpeed
would; a value ``"auto"`` is left to ds_hydra's defaults and derivations):

* the batch triple -> ``trainer.batch_size`` (``train_micro_batch_size_per_gpu``) and
  ``trainer.grad_accum_steps``; ``train_batch_size = micro x accumulation x world size`` (WORLD_SIZE
  under a launcher, else 1); a missing one is derived from the other two as DeepSpeed derives it, an
  inconsistent or indivisible triple is refused with the arithmetic;
* ``optimizer`` -> ``optimizer=<option>`` and its params (``Adam`` is AdamW unless ``adam_w_mode`` is
  false, as in DeepSpeed); ``scheduler`` -> DeepSpeed's five schedules and their params;
  ``total_num_steps`` also sets ``trainer.max_steps`` (both count optimizer steps);
* ``gradient_clipping`` -> ``trainer.grad_clip``; ``fp16``/``bf16``/``torch_autocast`` ->
  ``trainer.precision`` (neither enabled: fp32, as in DeepSpeed);
* ``zero_optimization`` -> ``engine=deepspeed`` with ``engine.zero_stage``, offload devices and bucket
  settings (the other ZeRO keys go to DeepSpeed in ``engine.extra``); without DeepSpeed installed, the
  nearest native engine: stage 0 -> auto, 1-2 -> ddp, 3 -> fsdp;
* ``activation_checkpointing`` -> ``ckpt.<same key>``; ``steps_per_print`` -> ``trainer.log_interval``;
* keys only DeepSpeed's engine reads (``wall_clock_breakdown``, ``communication_data_type``, fp16 loss
  scaling, ...) -> ``engine.extra`` when the engine is DeepSpeed's.

Every other key is listed once in one log line with why it has no meaning here; keys DeepSpeed would
refuse (an unknown optimizer, ``max_grad_norm``, fp16 and bf16 both on, a bad batch triple, negative
clipping, a warmup of 0 steps) are refused with one line each, exit code 2.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ds_hydra.deepspeed.keys import (  # the tables the mapper reads
    ACTIVATION_CHECKPOINTING_KEYS,
    ADAM_ONLY_PARAMS,
    AUTO,
    BATCH_KEYS,
    ENGINE_ONLY_KEYS,
    FP16_LOSS_SCALE_KEYS,
    IGNORED_KEYS,
    KNOWN_KEYS,
    MAPPED_KEYS,
    NATIVE_ENGINE,
    NO_TORCH_EQUIVALENT,
    OPTIMIZER_DEFAULTS,
    OPTIMIZER_SPELLING,
    OPTIMIZER_TYPES,
    REMOVED_KEYS,
    SCHEDULER_DEFAULTS,
    SCHEDULER_REQUIRED,
    SCHEDULER_TYPES,
    ZERO_ENGINE_KEYS,
)
from ds_hydra.errors import ConfigError, UserError

log = logging.getLogger(__name__)


# -- reading the file -----------------------------------------------------------------------------
def read_deepspeed_json(path, key: str = "deepspeed_config") -> Dict[str, Any]:
    """The JSON object in ``path``, read as DeepSpeed reads it (duplicate keys refused); one clear
    ``UserError`` line naming ``key`` and the file when it is missing, unreadable or not a JSON object."""
    path = Path(os.fspath(path)).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{key}={path}: no such file (a DeepSpeed JSON config, e.g. ds_config.json)") from None
    except IsADirectoryError:
        raise UserError(f"{key}={path}: is a directory, not a DeepSpeed JSON config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}={path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        try:
            config = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
        except json.JSONDecodeError as exc:
            config = _read_hjson(text, f"{key}={path}", exc)
    except _DuplicateKey as exc:
        raise UserError(f"{key}={path}: key {exc.args[0]!r} appears twice in one object (DeepSpeed refuses that too)") from None
    if not isinstance(config, dict):
        raise UserError(f"{key}={path}: must hold a JSON object ({{...}}), got a {type(config).__name__}")
    return config


def _read_hjson(text: str, where: str, json_error: json.JSONDecodeError) -> Any:
    """A file strict JSON refuses, read as DeepSpeed reads every config: with hjson (comments, trailing
    commas and unquoted strings allowed). hjson comes with DeepSpeed; without it, one line says so."""
    try:
        import hjson
    except ImportError:
        raise UserError(
            f"{where}: not valid JSON (line {json_error.lineno}, column {json_error.colno}: {json_error.msg}); "
            f"DeepSpeed reads its configs with hjson, which allows comments: pip install hjson"
        ) from None
    try:
        return hjson.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except hjson.HjsonDecodeError as exc:
        raise UserError(f"{where}: not valid JSON or hjson (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs):
    seen = {}
    for name, value in pairs:
        if name in seen:
            raise _DuplicateKey(name)
        seen[name] = value
    return seen


# -- the mapping ----------------------------------------------------------------------------------
@dataclass
class Override:
    """One ds_hydra override and the DeepSpeed key it comes from."""

    key: str  # e.g. optimizer.lr; a group choice is the group's name (optimizer)
    value: Any
    source: str  # e.g. optimizer.params.lr, or "DeepSpeed's default"
    add: bool = False  # ++key=value: a key the schema does not declare (engine.extra.*)

    def text(self) -> str:
        return f"{'++' if self.add else ''}{self.key}={hydra_value(self.value)}"


@dataclass
class Imported:
    """What a DeepSpeed config maps to, for one world size and the command line's own overrides."""

    path: str
    world_size: int
    overrides: List[Override] = field(default_factory=list)  # in order; the command line's keys removed
    overridden: List[Override] = field(default_factory=list)  # what the command line replaced
    notes: List[str] = field(default_factory=list)  # derivations and choices, one line each
    auto: List[str] = field(default_factory=list)  # DeepSpeed keys left to ds_hydra ("auto")
    ignored: Dict[str, str] = field(default_factory=dict)  # DeepSpeed key -> why it has no meaning here
    consumed: List[str] = field(default_factory=list)  # keys that chose or derived a value (type, enabled, ...)

    @property
    def override_texts(self) -> List[str]:
        return [o.text() for o in self.overrides]

    def log_lines(self) -> List[str]:
        """What the run logs: the overrides, the notes, and one line each for auto and ignored keys."""
        head = f"deepspeed_config={self.path}"
        lines = [f"{head}: {len(self.overrides)} overrides (world size {self.world_size}): {' '.join(self.override_texts)}"]
        lines += [f"{head}: {note}" for note in self.notes]
        if self.overridden:
            lines.append(f"{head}: the command line replaces " + ", ".join(f"{o.key} (file: {hydra_value(o.value)})" for o in self.overridden))
        if self.auto:
            lines.append(f"{head}: \"auto\", left to ds_hydra's defaults and derivations: {', '.join(self.auto)}")
        if self.ignored:
            lines.append(f"{head}: no meaning here, ignored: " + "; ".join(f"{k} ({why})" for k, why in self.ignored.items()))
        return lines


def import_deepspeed_config(
    config: Dict[str, Any],
    path: str = "ds_config.json",
    world_size: int = 1,
    deepspeed_available: bool = True,
    command_line: Sequence[str] = (),
) -> Imported:
    """Map a DeepSpeed config (a dict) to ds_hydra overrides. ``command_line``: the command's own
    overrides, which win (their keys, and everything under a group they choose, are dropped from the
    import). Raises ``ConfigError`` with every problem DeepSpeed would refuse, one line each."""
    mapper = _Mapper(config, world_size, deepspeed_available, _user_values(command_line))
    mapper.run()
    for override in mapper.out:  # keys the override grammar cannot carry ("x,y:{...},z"): named here, not by Hydra
        for where in _unsafe_keys(override.source, override.key, override.value):
            mapper.problems.append(f"key {where!r} cannot be passed on: DeepSpeed's keys are names "
                                   f"(letters, digits, _ and -); rename or remove it")
        for where, text in _interpolations(override.source, override.value):  # a JSON sets values, never resolvers
            mapper.problems.append(f"{where}={text!r}: an interpolation (${{...}}: reads the environment, other keys, "
                                   f"or builds nodes); a DeepSpeed JSON holds plain values: write the value itself")
    if mapper.problems:
        raise ConfigError([f"deepspeed_config={path}: {p}" for p in mapper.problems])
    imported = Imported(path=str(path), world_size=world_size, notes=mapper.notes, auto=mapper.auto,
                        ignored=mapper.ignored, consumed=mapper.consumed)
    # the command line's keys win; a group it chooses differently drops the file's settings of that group
    chosen = {o.key: o.value for o in mapper.out if "." not in o.key}
    user_keys = {k for k, v in mapper.user.items() if k not in chosen or v != str(chosen[k])}
    for override in mapper.out:
        if _covered(override.key, user_keys):
            imported.overridden.append(override)
        else:
            imported.overrides.append(override)
    return imported


def _interpolations(where: str, value: Any) -> List[Tuple[str, str]]:
    """``(DeepSpeed path, text)`` of every string in ``value`` that OmegaConf would resolve (``${...}``)."""
    if isinstance(value, str):
        return [(where, value)] if "${" in value else []
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _interpolations(f"{where}.{k}", v)]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in _interpolations(f"{where}[{i}]", v)]
    return []


_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _unsafe_keys(source: str, key: str, value: Any) -> List[str]:
    """The DeepSpeed paths of keys in an override (its own key, and the keys of a dict value) that are
    not plain names, which Hydra's override grammar would read as syntax."""
    bad = [] if all(_SAFE_KEY.fullmatch(part) for part in key.split(".")) else [source]
    return bad + _unsafe_dict_keys(source, value)


def _unsafe_dict_keys(where: str, value: Any) -> List[str]:
    if not isinstance(value, dict):
        return []
    bad = []
    for name, sub in value.items():
        path = f"{where}.{name}"
        bad += _unsafe_dict_keys(path, sub) if _SAFE_KEY.fullmatch(str(name)) else [path]
    return bad


def _covered(key: str, user_keys) -> bool:
    """Whether the command line sets ``key`` or a group/node above it."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in user_keys for i in range(1, len(parts) + 1))


def _user_values(command_line: Sequence[str]) -> Dict[str, str]:
    values = {}
    for arg in command_line:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        values[key.split("@", 1)[0].strip()] = value
    return values


class _Mapper:
    """Walks a DeepSpeed config, collecting overrides, notes, auto keys, ignored keys and problems."""

    def __init__(self, config: Dict[str, Any], world_size: int, deepspeed_available: bool, user: Dict[str, str]):
        self.config = config
        self.world = int(world_size)
        self.user = user
        self.out: List[Override] = []
        self.notes: List[str] = []
        self.auto: List[str] = []
        self.ignored: Dict[str, str] = {}
        self.consumed: List[str] = []  # keys read to choose or derive something, without an override of their own
        self.problems: List[str] = []
        self.engine_choice = self._engine_choice(deepspeed_available)
        self.engine = user.get("engine") or self.engine_choice  # the engine that will run: who reads engine.extra

    # -- helpers --
    def set(self, key: str, value: Any, source: str, add: bool = False) -> None:
        self.out.append(Override(key, value, source, add))

    def is_auto(self, value: Any, where: str) -> bool:
        if value == AUTO:
            self.auto.append(where)
            return True
        return False

    def ignore(self, where: str, why: str) -> None:
        self.ignored[where] = why

    def to_engine(self, where: str, value: Any, native_why: str) -> None:
        """A setting only DeepSpeed's engine reads (``where`` in its JSON): into engine.extra when it runs,
        else ignored with ``native_why``."""
        if self.engine == "deepspeed":
            self.set(f"engine.extra.{where}", value, where, add=True)
        else:
            self.ignore(where, native_why)

    def _engine_choice(self, deepspeed_available: bool) -> Optional[str]:
        """deepspeed, a native engine, or None (the file has no ZeRO section: ds_hydra's engine)."""
        zero = self.config.get("zero_optimization")
        if not isinstance(zero, dict):
            return None
        stage = zero.get("stage", 0)
        if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
            return None  # refused in _zero
        return "deepspeed" if deepspeed_available else NATIVE_ENGINE[stage]

    # -- the walk --
    def run(self) -> None:
        self._engine()
        self._batch()
        self._optimizer()
        self._scheduler()
        self._clipping()
        self._precision()
        self._zero()
        self._activation_checkpointing()
        self._steps_per_print()
        for key, value in self.config.items():
            if key in MAPPED_KEYS:
                continue
            if key in ENGINE_ONLY_KEYS:
                if not self.is_auto(value, key):
                    self.to_engine(key, value, "read only by DeepSpeed's engine, which this run does not use")
            elif key in IGNORED_KEYS:
                self.ignore(key, IGNORED_KEYS[key])
            elif key in REMOVED_KEYS:
                self.ignore(key, REMOVED_KEYS[key] + " (DeepSpeed 0.19.8 refuses it)")
            else:
                self.ignore(key, _not_deepspeed(key, KNOWN_KEYS))

    def _engine(self) -> None:
        choice = self.engine_choice
        if choice is None or "engine" in self.user:
            return
        if choice == "deepspeed":
            self.set("engine", "deepspeed", "zero_optimization")
        else:
            stage = self.config["zero_optimization"].get("stage", 0)
            if choice != "auto":
                self.set("engine", choice, "zero_optimization.stage")
            memory = {0: "", 1: " (every rank keeps the whole optimizer state)",
                      2: " (every rank keeps whole gradients and optimizer state)",
                      3: " (FSDP shards parameters, gradients and optimizer state, as ZeRO-3 does)"}[stage]
            self.notes.append(
                f"DeepSpeed is not installed: zero_optimization.stage={stage} runs on engine={choice}{memory}; "
                f"pip install 'ds-hydra[deepspeed]' for DeepSpeed's ZeRO"
            )

    # -- batch sizes --
    def _batch(self) -> None:
        """DeepSpeed's rules (runtime/config.py, _set_batch_related_parameters), with the command line's
        trainer.batch_size / trainer.grad_accum_steps in place of the file's micro-batch / accumulation."""
        given: Dict[str, Optional[int]] = {}
        bad = False
        for key in BATCH_KEYS:
            value = self.config.get(key)
            given[key] = None if value is None or self.is_auto(value, key) else _positive_int(value)
            if value is not None and value != AUTO and given[key] is None:
                self.problems.append(f"{key}={value!r}: must be a positive integer (or \"auto\")")
                bad = True
        if bad:
            return
        world = self.world
        user_mbs = _int_or_none(self.user.get("trainer.batch_size"))
        user_gas = _int_or_none(self.user.get("trainer.grad_accum_steps"))
        tbs = given["train_batch_size"]
        mbs = user_mbs or given["train_micro_batch_size_per_gpu"]
        gas = user_gas or given["gradient_accumulation_steps"]
        if tbs is not None and user_mbs and user_gas:
            if tbs != mbs * gas * world:
                self.notes.append(f"train_batch_size={tbs} gives way to the command line: trainer.batch_size {mbs} x "
                                  f"trainer.grad_accum_steps {gas} x world size {world} = {mbs * gas * world}")
            tbs = None
        elif tbs is not None and user_mbs:
            gas = None  # derived from the file's total and the command line's micro-batch
        elif tbs is not None and user_gas:
            mbs = None
        if tbs is not None and mbs is not None and gas is not None:
            if tbs != mbs * gas * world:
                written_for, rest = divmod(tbs, mbs * gas)
                if not rest and written_for > 1 and not (user_mbs or user_gas):
                    self.problems.append(
                        f"train_batch_size={tbs} = train_micro_batch_size_per_gpu {mbs} x gradient_accumulation_steps {gas} "
                        f"x {written_for} ranks: written for world size {written_for}, but this run has {world}; launch it "
                        f"on {written_for} ranks (hydra/launcher=torchrun hydra.launcher.nproc_per_node={written_for}, or "
                        f"torchrun --nproc_per_node={written_for}), or drop one of the three to derive it for {world}"
                    )
                    return
                self.problems.append(
                    f"train_batch_size={tbs} != train_micro_batch_size_per_gpu {mbs} x gradient_accumulation_steps {gas} "
                    f"x world size {world} = {mbs * gas * world}; give two of the three (the third is derived for the "
                    f"world size) or make them agree"
                )
                return
        elif tbs is not None and mbs is not None:
            gas = self._divide(tbs, mbs * world, "gradient_accumulation_steps",
                               f"train_micro_batch_size_per_gpu {mbs} x world size {world}")
        elif tbs is not None and gas is not None:
            mbs = self._divide(tbs, gas * world, "train_micro_batch_size_per_gpu",
                               f"gradient_accumulation_steps {gas} x world size {world}")
        elif tbs is not None:  # DeepSpeed: no accumulation, the total split over the ranks
            gas = 1
            mbs = self._divide(tbs, world, "train_micro_batch_size_per_gpu", f"world size {world}")
        elif mbs is not None and gas is None:
            gas = 1
        elif gas is not None and mbs is None:
            self.notes.append(f"gradient_accumulation_steps={gas} without a batch size (DeepSpeed refuses that): the "
                              f"micro-batch is ds_hydra's trainer.batch_size")
        if mbs is not None and not user_mbs:
            self.set("trainer.batch_size", mbs, "train_micro_batch_size_per_gpu")
        if gas is not None and not user_gas:
            self.set("trainer.grad_accum_steps", gas, "gradient_accumulation_steps")
        self.consumed += [k for k in BATCH_KEYS if given[k] is not None]
        if tbs is not None and mbs is not None and gas is not None:
            derived = [name for name in BATCH_KEYS[1:] if given[name] is None]
            if derived:
                self.notes.append(f"train_batch_size {tbs} = micro-batch {mbs} x accumulation {gas} x world size "
                                  f"{world}: derived {' and '.join(derived)}")

    def _divide(self, total: int, by: int, name: str, what: str) -> Optional[int]:
        if total % by:
            self.problems.append(
                f"train_batch_size={total} is not divisible by {what} = {by} ({name} would be {total / by:g}); "
                f"make train_batch_size a multiple of {by}"
            )
            return None
        return total // by

    # -- optimizer --
    def _optimizer(self) -> None:
        section = self.config.get("optimizer")
        if section is None:
            self.notes.append("no optimizer section: ds_hydra's optimizer (DeepSpeed would use the training code's)")
            return
        if not isinstance(section, dict):
            self.problems.append(f"optimizer: must be an object with type and params, got {section!r}")
            return
        name = section.get("type")
        allowed = ("allowed types: Adam, AdamW, Adagrad (DeepSpeed's) and SGD, RMSprop, Adamax, NAdam, RAdam "
                   f"(torch.optim's); {', '.join(NO_TORCH_EQUIVALENT)} have no torch equivalent")
        if not isinstance(name, str) or name.lower() not in OPTIMIZER_TYPES:
            self.problems.append(f"optimizer.type={name!r}: " + ("missing; " if name is None else "") + allowed)
            return
        for key in section:
            if key not in ("type", "params"):
                self.ignore(f"optimizer.{key}", "not a DeepSpeed optimizer key (type, params)")
        params = section.get("params") or {}
        if not isinstance(params, dict):
            self.problems.append(f"optimizer.params: must be an object, got {params!r}")
            return
        kind = name.lower()
        option = OPTIMIZER_TYPES[kind]
        if kind == "adam":
            w_mode = params.get("adam_w_mode", True)
            if w_mode == AUTO or not isinstance(w_mode, bool):
                self.problems.append(f"optimizer.params.adam_w_mode={w_mode!r}: must be true or false")
                return
            option = "adamw" if w_mode else "adam"
            if w_mode:
                self.notes.append("optimizer Adam: DeepSpeed's Adam decays weights as AdamW does (adam_w_mode defaults "
                                  "to true): optimizer=adamw")
        self.set("optimizer", option, "optimizer.type")
        self.consumed.append("optimizer.type")
        fields_ = _optimizer_arguments(option)
        for key, value in params.items():
            where = f"optimizer.params.{key}"
            if key == "max_grad_norm":
                self.problems.append(f"{where}: DeepSpeed refuses it; clip with gradient_clipping instead")
            elif kind in ("adam", "adamw") and key in ADAM_ONLY_PARAMS:
                self._adam_only(key, value, where)
            elif self.is_auto(value, where):
                continue
            elif key not in fields_:
                self.problems.append(f"{where}: torch.optim.{OPTIMIZER_SPELLING[option]} has no argument {key!r}"
                                     f"{_did_you_mean(key, fields_)}; allowed: {', '.join(fields_)}")
            else:
                self.set(f"optimizer.{key}", _plain(value), where)
        for key, value in OPTIMIZER_DEFAULTS[option].items():
            if key not in params:
                self.set(f"optimizer.{key}", value, "DeepSpeed's default")
        decay = params.get("weight_decay", 0.0)
        if isinstance(decay, (int, float)) and decay > 0:
            self.notes.append(f"optimizer.params.weight_decay={decay} applies to weight matrices and embeddings; biases "
                              f"and norm gains get none (ds_hydra's param_groups)")

    def _adam_only(self, key: str, value: Any, where: str) -> None:
        self.consumed.append(where)
        if key == "bias_correction" and value is False:
            self.problems.append(f"{where}=false: torch's Adam always corrects the moment bias; no equivalent")
        elif key == "fp32_optimizer_states":
            self.ignore(where, "DeepSpeed's CPU Adam; torch's optimizers keep state in the weights' dtype (fp32 here)")
        # adam_w_mode chose the option; torch_adam, set_grad_none and bias_correction=true are what ds_hydra does

    # -- scheduler --
    def _scheduler(self) -> None:
        section = self.config.get("scheduler")
        if section is None:
            self.notes.append("no scheduler section: ds_hydra's scheduler (DeepSpeed would use the training code's, "
                              "or a constant lr)")
            return
        if not isinstance(section, dict):
            self.problems.append(f"scheduler: must be an object with type and params, got {section!r}")
            return
        name = section.get("type")
        names = {n.lower(): n for n in SCHEDULER_TYPES}
        if not isinstance(name, str) or name.lower() not in names:
            self.problems.append(f"scheduler.type={name!r}: allowed types: {', '.join(SCHEDULER_TYPES)} (DeepSpeed's "
                                 f"schedules; torch's lr_scheduler classes have no ds_hydra option)")
            return
        for key in section:
            if key not in ("type", "params"):
                self.ignore(f"scheduler.{key}", "not a DeepSpeed scheduler key (type, params)")
        name = names[name.lower()]
        params = section.get("params") or {}
        if not isinstance(params, dict):
            self.problems.append(f"scheduler.params: must be an object, got {params!r}")
            return
        option = SCHEDULER_TYPES[name]
        self.set("scheduler", option, "scheduler.type")
        self.consumed.append("scheduler.type")
        fields_ = _schema_fields("scheduler", option)
        for key, value in params.items():
            where = f"scheduler.params.{key}"
            if self.is_auto(value, where):
                continue
            if key not in fields_:
                self.problems.append(f"{where}: {name} has no argument {key!r}{_did_you_mean(key, fields_)}; allowed: "
                                     f"{', '.join(fields_)}")
            elif key == "warmup_num_steps":
                self._warmup_steps(value, where)
            elif key == "warmup_type" and value not in ("log", "linear"):
                self.problems.append(f"{where}={value!r}: allowed values: log, linear (DeepSpeed would silently use log)")
            elif key == "total_num_steps":
                self._total_steps(value, where)
            else:
                self.set(f"scheduler.{key}", _plain(value), where)
        for key, value in SCHEDULER_DEFAULTS[name].items():
            if key not in params:
                self.set(f"scheduler.{key}", value, "DeepSpeed's default")
        for key, filled in SCHEDULER_REQUIRED.get(name, {}).items():
            if key not in params:
                self.notes.append(f"scheduler.params.{key} missing (DeepSpeed requires it): ds_hydra's scheduler.{key} "
                                  f"({filled})")

    def _warmup_steps(self, value: Any, where: str) -> None:
        steps = _positive_int(value) if value != 0 else 0
        if steps == 0:
            self.problems.append(
                f"{where}=0: DeepSpeed's schedules warm up over at least 2 steps and start at warmup_min_lr (0 and 1 "
                f"become 2); for no warmup set warmup_min_lr to the peak lr (WarmupLR: or use scheduler=constant)"
            )
        elif steps is None:
            self.problems.append(f"{where}={value!r}: must be a positive integer")
        else:
            if steps == 1:
                self.notes.append(f"{where}=1: DeepSpeed warms up over 2 steps (log(1) = 0): the first step runs at "
                                  f"warmup_min_lr, the peak comes at the second")
            self.set("scheduler.warmup_num_steps", steps, where)

    def _total_steps(self, value: Any, where: str) -> None:
        steps = _positive_int(value)
        if steps is None:
            self.problems.append(f"{where}={value!r}: must be a positive integer (optimizer steps)")
            return
        self.set("scheduler.total_num_steps", steps, where)
        user = _int_or_none(self.user.get("trainer.max_steps"))
        meaning = ("counts optimizer steps (each of train_batch_size samples: accumulation and every rank "
                   "included), as trainer.max_steps does")
        if user is None:
            self.set("trainer.max_steps", steps, where)
            self.notes.append(f"{where}={steps} {meaning}: the run trains {steps} steps (trainer.max_steps)")
        elif user != steps:
            end = "ends before the run does, then holds its floor" if steps < user else "is cut off by the run's end"
            self.notes.append(f"{where}={steps} {meaning}; with trainer.max_steps={user} the schedule {end}")

    # -- clipping, precision, steps_per_print --
    def _clipping(self) -> None:
        value = self.config.get("gradient_clipping")
        if value is None:
            self.set("trainer.grad_clip", 0.0, "no gradient_clipping")
            self.notes.append("no gradient_clipping: DeepSpeed does not clip (trainer.grad_clip=0)")
        elif self.is_auto(value, "gradient_clipping"):
            return
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            self.problems.append(f"gradient_clipping={value!r}: must be a number >= 0 (0 disables clipping)")
        else:
            self.set("trainer.grad_clip", float(value), "gradient_clipping")

    def _precision(self) -> None:
        fp16, bf16 = self._section("fp16"), self._section("bf16")
        if "bfloat16" in self.config:
            if "bf16" in self.config:
                self.ignore("bfloat16", "DeepSpeed's old name of bf16, which the file also has (bf16 wins)")
            else:
                bf16 = self._section("bfloat16")
        autocast = self._section("torch_autocast")
        enabled = {name: section.get("enabled", False) for name, section in
                   (("fp16", fp16), ("bf16", bf16), ("torch_autocast", autocast)) if section is not None}
        for name, value in enabled.items():
            if value != AUTO and not isinstance(value, bool):
                self.problems.append(f"{name}.enabled={value!r}: must be true, false or \"auto\"")
                return
        on = [name for name, value in enabled.items() if value is True]
        if "fp16" in on and "bf16" in on:
            self.problems.append("fp16.enabled and bf16.enabled are both true: DeepSpeed refuses that; enable one")
            return
        if not on and any(v == AUTO for v in enabled.values()):
            self.auto += [f"{name}.enabled" for name, v in enabled.items() if v == AUTO]
            precision = None
        elif "fp16" in on:
            precision = "fp16"
            self.notes.append("fp16.enabled=true -> trainer.precision=fp16, which needs CUDA; on a CPU add "
                              "trainer.precision=bf16 (or fp32)")
        elif "bf16" in on:
            precision = "bf16"
        elif "torch_autocast" in on:
            precision = self._autocast_precision(autocast.get("dtype", "bfloat16"))
        else:
            precision = "fp32"
            self.notes.append("neither fp16 nor bf16 is enabled: DeepSpeed trains in fp32 (trainer.precision=fp32)")
        self.consumed += [f"{name}.enabled" for name in enabled] + (["torch_autocast.dtype"] if autocast else [])
        if precision is not None:
            self.set("trainer.precision", precision, "fp16/bf16")
        for name, section in (("fp16", fp16), ("bf16", bf16)):  # "auto" may resolve to either at run time
            self._precision_details(name, section, precision == name or enabled.get(name) == AUTO)
        if autocast is not None:
            for key in autocast:
                if key not in ("enabled", "dtype"):
                    self.ignore(f"torch_autocast.{key}", "ds_hydra's autocast covers the whole forward")

    def _section(self, name: str) -> Optional[Dict[str, Any]]:
        section = self.config.get(name)
        if section is None:
            return None
        if not isinstance(section, dict):
            self.problems.append(f"{name}: must be an object such as {{\"enabled\": true}}, got {section!r}")
            return None
        return section

    def _autocast_precision(self, dtype: Any) -> Optional[str]:
        names = {"bfloat16": "bf16", "bf16": "bf16", "torch.bfloat16": "bf16", "float16": "fp16", "fp16": "fp16",
                 "half": "fp16", "torch.float16": "fp16"}
        if dtype not in names:
            self.problems.append(f"torch_autocast.dtype={dtype!r}: allowed: bfloat16, float16")
            return None
        return names[dtype]

    def _precision_details(self, name: str, section: Optional[Dict[str, Any]], used: bool) -> None:
        for key, value in (section or {}).items():
            where = f"{name}.{key}"
            if key == "enabled" or self.is_auto(value, where):
                continue
            if not used:
                self.ignore(where, f"{name} is not enabled")
            elif name == "fp16" and key in FP16_LOSS_SCALE_KEYS:
                self.to_engine(where, value, "engine=deepspeed's loss scaling; ds_hydra's fp16 uses torch's "
                                                    "GradScaler (dynamic, from 2^16, doubled every 2000 clean steps)")
            else:
                self.to_engine(where, value, f"DeepSpeed's {name} optimizer wrapper; ds_hydra's {name} autocast "
                                                    f"keeps fp32 weights and optimizer state")

    def _steps_per_print(self) -> None:
        value = self.config.get("steps_per_print")
        if value is None or self.is_auto(value, "steps_per_print"):
            return
        steps = _positive_int(value)
        if steps is None:
            self.problems.append(f"steps_per_print={value!r}: must be a positive integer")
        else:
            self.set("trainer.log_interval", steps, "steps_per_print")

    # -- ZeRO --
    def _zero(self) -> None:
        zero = self._section("zero_optimization")
        if zero is None:
            return
        stage = zero.get("stage", 0)
        if stage == AUTO:
            self.auto.append("zero_optimization.stage")
        elif not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
            self.problems.append(f"zero_optimization.stage={stage!r}: must be 0, 1, 2 or 3")
            return
        elif self.engine == "deepspeed":
            self.set("engine.zero_stage", stage, "zero_optimization.stage")
        self.consumed.append("zero_optimization.stage")
        native_why = f"ZeRO setting of DeepSpeed's engine; engine={self.engine} does not use it"
        for key, value in zero.items():
            where = f"zero_optimization.{key}"
            if key == "stage" or self.is_auto(value, where):
                continue
            if key in ("offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_params"):
                self._offload(key, value, where)
            elif key in ZERO_ENGINE_KEYS and self.engine == "deepspeed":
                if key == "reduce_bucket_size" and _positive_int(value) is None:
                    self.problems.append(f"{where}={value!r}: must be a positive integer (elements)")
                else:
                    self.set(f"engine.{key}", _positive_int(value) if key == "reduce_bucket_size" else value, where)
            else:
                self.to_engine(where, value, native_why)

    def _offload(self, key: str, value: Any, where: str) -> None:
        """offload_optimizer/offload_param ({device, nvme_path, pin_memory, ...}) and the old booleans."""
        target = "offload_param" if key in ("offload_param", "cpu_offload_params") else "offload_optimizer"
        self.consumed.append(where if key.startswith("cpu_offload") else f"{where}.device")
        if key.startswith("cpu_offload"):
            if not isinstance(value, bool):
                self.problems.append(f"{where}={value!r}: must be true or false")
                return
            section = {"device": "cpu" if value else "none"}
        elif isinstance(value, dict):
            section = value
        else:
            self.problems.append(f"{where}: must be an object such as {{\"device\": \"cpu\"}}, got {value!r}")
            return
        device = section.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            self.problems.append(f"{where}.device={device!r}: allowed: none, cpu, nvme")
            return
        if self.engine == "deepspeed":
            self.set(f"engine.{target}", device, f"{where}.device")
            for sub, sub_value in section.items():
                sub_where = f"{where}.{sub}"
                if sub == "device" or self.is_auto(sub_value, sub_where):
                    continue
                if sub == "nvme_path":
                    self.set("engine.nvme_path", sub_value, sub_where)
                else:
                    self.set(f"engine.extra.zero_optimization.{target}.{sub}", sub_value, sub_where, add=True)
        elif self.engine == "fsdp" and device == "cpu":
            self.set("engine.cpu_offload", True, f"{where}.device")
            self.notes.append(f"{where}.device=cpu on engine=fsdp: engine.cpu_offload=true (FSDP keeps shards, "
                              f"gradients and optimizer state in host memory)")
            for sub in section:
                if sub != "device":
                    self.ignore(f"{where}.{sub}", "FSDP's CPU offload has no such setting")
        elif device != "none":
            self.ignore(where, f"engine={self.engine} offloads nothing" + (" to NVMe" if self.engine == "fsdp" else ""))

    # -- activation checkpointing --
    def _activation_checkpointing(self) -> None:
        section = self._section("activation_checkpointing")
        for key, value in (section or {}).items():
            where = f"activation_checkpointing.{key}"
            if self.is_auto(value, where):
                continue
            if key not in ACTIVATION_CHECKPOINTING_KEYS:
                self.ignore(where, _not_deepspeed(key, ACTIVATION_CHECKPOINTING_KEYS))
            elif key == "number_checkpoints":
                if value is None:
                    self.consumed.append(where)  # DeepSpeed's default: no segments policy
                    continue
                if _positive_int(value) is None:
                    self.problems.append(f"{where}={value!r}: must be a positive integer or null")
                else:
                    self.set("ckpt.number_checkpoints", _positive_int(value), where)
                    self.notes.append(f"{where}={value}: ds_hydra recomputes the model's blocks in {value} segments "
                                      f"(ckpt.number_checkpoints, = ckpt.segments)")
            elif not isinstance(value, bool):
                self.problems.append(f"{where}={value!r}: must be true or false")
            else:
                self.set(f"ckpt.{key}", value, where)


# -- values -----------------------------------------------------------------------------------------
def _positive_int(value: Any) -> Optional[int]:
    """``value`` as a positive int (an integral float such as 5e8 too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _plain(value: Any) -> Any:
    """JSON values as the config takes them: an integral float stays a float (lr 1 is 1.0 anyway)."""
    return list(value) if isinstance(value, tuple) else value


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (null, true, numbers, quoted strings, [lists], {dicts})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", text) and text not in ("null", "true", "false", "auto"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    """ " (did you mean 'x'?)" for the closest option, or "". """
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _not_deepspeed(word: str, options: Sequence[str]) -> str:
    """Why an unknown key is ignored (DeepSpeed ignores unknown keys too), with the closest known key."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return "not a DeepSpeed key, which DeepSpeed ignores too" + (f"; did you mean {close[0]!r}?" if close else "")


def _optimizer_arguments(option: str) -> List[str]:
    """The keyword arguments of the torch.optim class an optimizer option builds (imports torch)."""
    import inspect

    import torch

    return [n for n in inspect.signature(getattr(torch.optim, OPTIMIZER_SPELLING[option])).parameters if n != "params"]


def _schema_fields(group: str, option: str) -> List[str]:
    """The keyword arguments a scheduler option takes (its schema's fields)."""
    from ds_hydra.config_store import SCHEMAS

    for g, name, schema in SCHEMAS:
        if g == group and name == option:
            return [f.name for f in fields(schema) if not f.name.startswith("_")]
    raise KeyError(f"{group}/{option}")  # pragma: no cover - the tables above name existing options
