"""The one place where config nodes with ``_target_`` become Python objects, behind an allowlist.

A config can name any importable callable in ``_target_``, so a config file is code. ds_hydra only
instantiates callables that live under an allowed module prefix: ``torch.optim``,
``torch.optim.lr_scheduler`` and ``ds_hydra`` by default, plus the prefixes listed in the config's
top-level ``allowed_targets`` (``allowed_targets=[my_project.models]``). Every ``_target_`` at any
depth is checked twice, before anything is built:

1. the written path must be under an allowed prefix (so no other module is even imported), and
2. the object it resolves to must be defined under an allowed prefix too (its ``__module__``), so an
   alias such as ``ds_hydra.cli.os.system`` (``os`` imported into an allowed module) is refused.

``signature_problems`` adds a third check without calling anything: each node's keys bind to its
callable's signature, so an argument it does not take fails naming the key.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Iterator, List, Optional, Sequence, Tuple

DEFAULT_ALLOWED_TARGETS: Tuple[str, ...] = ("torch.optim", "torch.optim.lr_scheduler", "ds_hydra")


def instantiate(node: Any, *args: Any, _allowed_: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` after checking every ``_target_`` in ``node`` against the allowlist.

    ``_allowed_`` adds prefixes to the defaults; when ``node`` is part of a composed config, its
    root's ``allowed_targets`` are added too. Containers are converted to plain lists and dicts:
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
    """The defaults, ``extra``, and the ``allowed_targets`` of the config ``node`` belongs to."""
    prefixes = list(DEFAULT_ALLOWED_TARGETS) + list(extra or [])
    root = _config_root(node)
    if root is not None:
        prefixes += [str(p) for p in (root.get("allowed_targets", None) or [])]
    return [p.strip().rstrip(".") for p in prefixes if str(p).strip()]


def target_problems(node: Any, allowed: Sequence[str], path: str = "") -> List[str]:
    """One message per refused or unresolvable ``_target_`` in ``node`` (any depth); [] if all are fine."""
    return [problem for key, n in iter_targets(node, path) for problem in _check_target(key, _value(n, "_target_"), allowed)]


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
    fix = f"allowed prefixes: {', '.join(allowed)}; to allow it add its module to allowed_targets"
    if not is_allowed(target, allowed):
        module = target.rsplit(".", 1)[0]
        return [f"{where}={target}: not an allowed target ({fix}, e.g. allowed_targets=[{module}])"]
    try:
        obj = locate_target(target)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        reason = str(exc).strip().splitlines()
        return [f"{where}={target}: cannot be imported ({reason[-1] if reason else type(exc).__name__})"]
    if isinstance(obj, ModuleType):
        return [f"{where}={target}: is a module, not a callable"]
    home = defined_in(obj)
    if home is None:
        return [f"{where}={target}: cannot tell where the object is defined, so it is refused ({fix})"]
    if not is_allowed(home, allowed):
        module = home.rsplit(".", 1)[0]
        return [
            f"{where}={target}: resolves to {home}, which is outside the allowed prefixes "
            f"({fix}, e.g. allowed_targets=[{module}])"
        ]
    if not callable(obj):
        return [f"{where}={target}: is a {type(obj).__name__}, not a callable"]
    return []


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
