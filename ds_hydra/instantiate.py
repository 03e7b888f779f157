"""The one place where config nodes with ``_target_`` become Python objects, behind an allowlist.

A config can name any importable callable in ``_target_``, so a config that reaches ``instantiate`` is
code unless its targets are held to a list. A run directory, a saved override list or a DeepSpeed JSON
is data (README "Security model"), so ds_hydra allows, without being asked, only the callables it ships
for the key being built (``SHIPPED_TARGETS``: a run's saved ``model`` can name only one of ds_hydra's
model builders), each one safe to call with config data. Not whole packages: ``ds_hydra`` also holds
launchers and loaders that take command lines and file names. The user's own code comes in through the
module prefixes of ``allowed_targets`` (``allowed_targets=[my_project.models]``) of the config being
built; a rebuilt run's own ``allowed_targets`` are never used (``ds_hydra.inference.loading``). Every
``_target_`` at any depth is checked before anything is built:

1. the written path must be a shipped target of its key, or lie under a user prefix (so no other
   module is even imported), and
2. for a user prefix, the object it resolves to must be defined under one too (its ``__module__``), so
   an alias such as ``my_pkg.os.system`` (``os`` imported into an allowed module) is refused.

Hydra instantiates ``hydra.callbacks`` itself, outside this module: ``hydra_callback_problems`` holds them
to the same list, and ``hydra_callbacks_checked`` (around the CLI's Hydra app) runs it before Hydra builds any.

``signature_problems`` adds a third check without calling anything: each node's keys bind to its
callable's signature, so an argument it does not take fails naming the key.
"""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

# torch's optimizer and LR scheduler classes: each builds from numbers and lists (names a later torch
# adds are refused until listed; a name an older torch lacks is refused as not importable).
_TORCH_OPTIMIZERS = (
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam", "RAdam",
    "RMSprop", "Rprop", "SGD", "SparseAdam",
)
_TORCH_SCHEDULERS = (
    "ChainedScheduler", "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
    "ExponentialLR", "LambdaLR", "LinearLR", "MultiStepLR", "MultiplicativeLR", "OneCycleLR", "PolynomialLR",
    "ReduceLROnPlateau", "SequentialLR", "StepLR",
)

# The callables ds_hydra's own configs name, by the top-level key they build ("hydra.callbacks": Hydra's
# callbacks). Each builds an object from numbers, strings and lists and reads only the data files it is
# given: none starts a process, imports a module the config names, or unpickles a file.
SHIPPED_TARGETS: Dict[str, FrozenSet[str]] = {
    "model": frozenset({"ds_hydra.models.gpt.GPT", "ds_hydra.models.hf.causal_lm"}),
    "data": frozenset(
        {
            "ds_hydra.data.corpus.SyntheticTokens",
            "ds_hydra.data.tokens.TokenFiles",
            "ds_hydra.data.text.TextData",
            "ds_hydra.data.sft.SFTData",
        }
    ),
    "loss": frozenset({"ds_hydra.loss.cross_entropy.CrossEntropyLoss", "ds_hydra.loss.cross_entropy.ChunkedCrossEntropyLoss"}),
    "optimizer": frozenset(
        {
            *(f"torch.optim.{name}" for name in _TORCH_OPTIMIZERS),
            "bitsandbytes.optim.AdamW8bit",  # optimizer=adamw8bit (the quant extra)
            "torchao.optim.AdamW4bit",  # optimizer=adamw4bit (the quant extra)
        }
    ),
    "scheduler": frozenset(
        {
            "ds_hydra.optim.schedules.ConstantLR",
            "ds_hydra.optim.schedules.WarmupCosineDecay",
            "ds_hydra.optim.schedules.WarmupStableDecay",
            "ds_hydra.deepspeed.lr_schedules.WarmupLR",
            "ds_hydra.deepspeed.lr_schedules.WarmupDecayLR",
            "ds_hydra.deepspeed.lr_schedules.WarmupCosineLR",
            "ds_hydra.deepspeed.lr_schedules.OneCycle",
            "ds_hydra.deepspeed.lr_schedules.LRRangeTest",
            *(f"torch.optim.lr_scheduler.{name}" for name in _TORCH_SCHEDULERS),
        }
    ),
    "hydra.callbacks": frozenset({"ds_hydra.cli.preflight.Preflight", "ds_hydra.sweeps.SweepSummary"}),
}
# A node outside those keys (a plain dict, a key of the user's own) may name any of them.
_ANY_SHIPPED: FrozenSet[str] = frozenset().union(*SHIPPED_TARGETS.values())


def shipped_targets(key: str) -> FrozenSet[str]:
    """The shipped callables a ``_target_`` at the dotted ``key`` may name (``model.x`` -> the models)."""
    if key == "hydra.callbacks" or key.startswith("hydra.callbacks."):
        return SHIPPED_TARGETS["hydra.callbacks"]
    top = key.split(".", 1)[0].split("[", 1)[0]
    return SHIPPED_TARGETS.get(top, _ANY_SHIPPED)


def instantiate(node: Any, *args: Any, _allowed_: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` after checking every ``_target_`` in ``node`` against the allowlist.

    ``_allowed_``: the user's module prefixes; when ``node`` is part of a composed config, its root's
    ``allowed_targets`` are added. Containers are converted to plain lists and dicts:
    optimizer hyper-parameters end up in ``state_dict()``, and a saved ``ListConfig`` could not be
    loaded back with ``torch.load(weights_only=True)``.
    """
    from hydra.utils import instantiate as hydra_instantiate

    from ds_hydra.errors import ConfigError

    allowed = allowed_prefixes(node, _allowed_)
    problems = target_problems(node, allowed, path=_full_key(node))
    for key, value in kwargs.items():
        problems += target_problems(value, allowed, path=key)
    if problems:
        raise ConfigError(problems)
    return hydra_instantiate(node, *args, _convert_="all", **kwargs)


def allowed_prefixes(node: Any = None, extra: Optional[Sequence[str]] = None) -> List[str]:
    """The user's module prefixes: ``extra`` and the ``allowed_targets`` of the config ``node`` belongs to."""
    prefixes = list(extra or [])
    root = _config_root(node)
    if root is not None:
        prefixes += [str(p) for p in (root.get("allowed_targets", None) or [])]
    return [p.strip().rstrip(".") for p in prefixes if str(p).strip()]


def target_problems(node: Any, allowed: Sequence[str], path: str = "") -> List[str]:
    """One message per refused or unresolvable ``_target_`` in ``node`` (any depth); [] if all are fine.
    The nodes inside a refused one are not reported: nothing of it will be built."""
    problems: List[str] = []
    refused: List[str] = []
    for key, n in iter_targets(node, path):
        if any(_inside(key, outer) for outer in refused):
            continue
        found = _check_target(key, _value(n, "_target_"), allowed)
        if found:
            problems += found
            refused.append(key)
    return problems


def _inside(key: str, outer: str) -> bool:
    return not outer or key.startswith(outer + ".") or key.startswith(outer + "[")


def signature_problems(node: Any, path: str = "") -> List[str]:
    """Every ``_target_`` in ``node`` (any depth): allowed, importable, and given only arguments it takes.

    The config's keys are bound to the callable's signature (as torchtune validates its components):
    an unknown argument is named with a did-you-mean and the arguments the callable takes; a missing
    required one too, except on ``_partial_`` nodes (the caller supplies the rest: parameters, the
    optimizer) and for what ds_hydra passes itself (``RUNTIME_ARGUMENTS``). Nothing is called.
    """
    problems = target_problems(node, allowed_prefixes(node), path)
    if problems:  # refused or unimportable targets: their signatures cannot be checked
        return problems
    for key, target_node in iter_targets(node, path):
        problems += _binding_problems(target_node, key)
    return problems


def admits(key: str, target: str, allowed: Sequence[str]) -> bool:
    """Whether the written ``target`` at ``key`` passes the first check (nothing is imported)."""
    return target in shipped_targets(key) or is_allowed(target, allowed)


def hydra_callback_problems(cfg: Any) -> List[str]:
    """The refused ``_target_``s under ``hydra.callbacks`` of a composed config (with its ``hydra`` node):
    the same list as every other ``_target_`` (ds_hydra's own callbacks, the config's allowed_targets)."""
    from omegaconf import OmegaConf

    callbacks = OmegaConf.select(cfg, "hydra.callbacks", default=None)
    if not callbacks:
        return []
    return target_problems(callbacks, allowed_prefixes(cfg), path="hydra.callbacks")


@contextmanager
def hydra_callbacks_checked() -> Iterator[None]:
    """While Hydra runs the app: ``hydra.callbacks`` are checked against the allowlist before Hydra builds any.

    Hydra composes the config and at once builds every ``hydra.callbacks`` entry itself (``Callbacks(cfg)``
    in ``hydra._internal.hydra``, through its own instantiate: a callback's ``_target_`` is called as it is
    built, before any hook of ours). It offers no hook in between, so for the duration the name Hydra
    calls runs ``hydra_callback_problems`` first, then Hydra's own ``Callbacks``; a refusal is a
    ``ConfigError`` (one line per target, nothing built). Where Hydra is not laid out so, the run is
    refused rather than unchecked.
    """
    from ds_hydra.errors import ConfigError, UserError

    try:
        import hydra._internal.hydra as hydra_app

        original = hydra_app.Callbacks
    except (ImportError, AttributeError):
        import hydra

        raise UserError(
            f"hydra-core {hydra.__version__}: ds_hydra cannot check hydra.callbacks before this Hydra builds them; "
            "install hydra-core 1.3.x"
        ) from None

    def checked_callbacks(config: Any = None, *args: Any, **kwargs: Any) -> Any:
        problems = hydra_callback_problems(config) if config is not None else []
        if problems:
            raise ConfigError(problems)
        return original(config, *args, **kwargs)  # Hydra's own object (sweep launchers pickle it to their jobs)

    hydra_app.Callbacks = checked_callbacks
    try:
        yield
    finally:
        hydra_app.Callbacks = original


# Arguments ds_hydra passes itself when it instantiates the node at this key.
RUNTIME_ARGUMENTS = {"model": ("vocab_size",)}
# Keys of the node at this key that ds_hydra reads itself and never passes to the callable
# (model.quantize: how the built model's frozen weights are stored, ds_hydra.models.adapters).
OWN_KEYS = {"model": ("quantize",)}
_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _binding_problems(node: Any, path: str) -> List[str]:
    import inspect

    target = _value(node, "_target_")
    try:
        params = inspect.signature(locate_target(target)).parameters
    except (TypeError, ValueError):  # some builtins have no signature to check against
        return []
    where = f"{path}." if path else ""
    keys = [str(k) for k in node.keys() if k not in _HYDRA_KEYS and k not in OWN_KEYS.get(path, ())]
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    problems = []
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        problems += [
            f"{where}{key}: {target} has no argument '{key}'{_did_you_mean(key, named)}; it takes: {', '.join(named)}"
            for key in keys
            if key not in params
        ]
    for key in (k for k in keys if k in params):
        value, default = _value(node, key), params[key].default
        kind = _kind_expected(default, value)
        if kind:
            problems.append(f"{where}{key}={value}: {target} takes {kind} here (its default is {default!r})")
    if not node.get("_partial_", False):
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        supplied = {*keys, *positional[: len(node.get("_args_", None) or [])], *RUNTIME_ARGUMENTS.get(path, ())}
        problems += [
            f"{where}{name}: missing; {target} needs it (set {where}{name}=...)"
            for name, p in params.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in supplied
        ]
    return problems


def _kind_expected(default: Any, value: Any) -> Optional[str]:
    """What ``value`` should have been, judged by the argument's default; None when it fits (or there is
    no default to judge by: null, required)."""
    from numbers import Real

    from omegaconf import ListConfig

    if value is None or default is None or isinstance(default, type):  # inspect.Parameter.empty is a class
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, Real):
        return None if isinstance(value, Real) and not isinstance(value, bool) else "a number"
    if isinstance(default, (tuple, list)):
        return None if isinstance(value, (tuple, list, ListConfig)) else "a list"
    return None


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def iter_targets(node: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    """``(dotted key, node)`` for every node with a ``_target_`` in ``node``, outermost first."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, (dict, DictConfig)):
        keys = list(node.keys())
        if "_target_" in keys:
            yield path, node
        for key in keys:
            if key == "_target_":
                continue
            child = _value(node, key)
            if isinstance(child, (dict, list, tuple, DictConfig, ListConfig)):
                yield from iter_targets(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple, ListConfig)):
        for i in range(len(node)):
            child = _value(node, i)
            if isinstance(child, (dict, list, tuple, DictConfig, ListConfig)):
                yield from iter_targets(child, f"{path}[{i}]")


def locate_target(target: str) -> Any:
    """The object a ``_target_`` path names (imports its module); ImportError if there is none."""
    from hydra._internal.utils import _locate

    return _locate(target)


def defined_in(obj: Any) -> Optional[str]:
    """Where ``obj`` is really defined, ``module.QualName``, or None if it does not say."""
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not module:
        return None
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def is_allowed(dotted: str, allowed: Sequence[str]) -> bool:
    """``dotted`` equals an allowed prefix or lies below one (``torch.optim.AdamW``, not ``torch.optimx``)."""
    return any(dotted == prefix or dotted.startswith(prefix + ".") for prefix in allowed)


def _check_target(key: str, target: Any, allowed: Sequence[str]) -> List[str]:
    where = f"{key}._target_" if key else "_target_"
    if not isinstance(target, str) or not target:
        return [f"{where}={target!r}: must be a dotted path such as torch.optim.AdamW"]
    if target in shipped_targets(key):  # an exact name from ds_hydra's own list: what it resolves to is ours
        return _resolvable(where, target)
    module = target.rsplit(".", 1)[0]
    if not is_allowed(target, allowed):
        if target == "ds_hydra" or target.startswith("ds_hydra."):  # launchers, loaders: never built from a config
            return [f"{where}={target}: not an allowed target ({_shipped_text(key)}; none of its other callables is built from a config)"]
        return [
            f"{where}={target}: not an allowed target ({_shipped_text(key)}; for your own code add its module to "
            f"allowed_targets on the command line, e.g. allowed_targets=[{module}])"
        ]
    problems = _resolvable(where, target)
    if problems:
        return problems
    home = defined_in(locate_target(target))
    if home is None:
        return [f"{where}={target}: cannot tell where the object is defined, so it is refused (allowed_targets: {', '.join(allowed)})"]
    if not is_allowed(home, allowed):
        return [
            f"{where}={target}: resolves to {home}, which is outside allowed_targets ({', '.join(allowed)}); to allow "
            f"it add its own module, e.g. allowed_targets=[{home.rsplit('.', 1)[0]}]"
        ]
    return []


def _resolvable(where: str, target: str) -> List[str]:
    """[] when ``target`` imports and is a callable; else why not."""
    try:
        obj = locate_target(target)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        reason = str(exc).strip().splitlines()
        return [f"{where}={target}: cannot be imported ({reason[-1] if reason else type(exc).__name__})"]
    if isinstance(obj, ModuleType):
        return [f"{where}={target}: is a module, not a callable"]
    if not callable(obj):
        return [f"{where}={target}: is a {type(obj).__name__}, not a callable"]
    return []


def _shipped_text(key: str) -> str:
    """What ds_hydra builds at ``key`` without being asked, short enough for one line."""
    shipped = shipped_targets(key)
    if shipped is SHIPPED_TARGETS["optimizer"]:
        return "as optimizer ds_hydra builds torch.optim's optimizer classes"
    if shipped is SHIPPED_TARGETS["scheduler"]:
        return "as scheduler ds_hydra builds its schedules and torch.optim.lr_scheduler's classes"
    if shipped is _ANY_SHIPPED:
        return "ds_hydra builds only its own models, data, optimizers, schedules and callbacks"
    role = "hydra.callbacks" if key.startswith("hydra.callbacks") else key.split(".", 1)[0].split("[", 1)[0]
    return f"as {role} ds_hydra builds only {', '.join(sorted(shipped))}"


def _value(node: Any, key: Any) -> Any:
    """``node[key]``, resolving interpolations when possible (the raw value otherwise)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return node[key]
        except Exception:  # an interpolation that cannot resolve here: report the raw text
            return node._get_node(key)._value()
    return node[key]


def _full_key(node: Any) -> str:
    """The dotted key of ``node`` in its composed config ("model" for cfg.model), "" for a root or a dict."""
    from omegaconf import DictConfig

    if isinstance(node, DictConfig) and node._get_parent() is not None:
        return str(node._get_full_key(None) or "")
    return ""


def _config_root(node: Any):
    from omegaconf import DictConfig, ListConfig

    if not isinstance(node, (DictConfig, ListConfig)):
        return None
    root = node._get_root()
    return root if isinstance(root, DictConfig) else None
