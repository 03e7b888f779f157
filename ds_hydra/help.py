"""``python -m ds_hydra --help``: the user's config groups and their options, without the internal
``schema/*`` groups Hydra would list beside them (conf/hydra/help/ds_hydra.yaml is the page;
``${ds_hydra.config_groups:}`` fills in the groups). Torch-free."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

# Groups the page does not list: the schemas the option YAMLs extend, and Hydra's own (but the launchers).
_HIDDEN = ("schema", "hydra")
# Groups that take several options at once.
_MULTI = {"logger": "several at once: 'logger=[jsonl,csv,tensorboard,wandb,mlflow]'"}


def config_groups(_root_: Any = None) -> str:
    """One line per group: its options, the default marked with ``*``; then Hydra's launchers.

    Composition merges into ``hydra.help`` before the command's choices exist, which evaluates the
    page's interpolations; listing every group's options there would cost every run a scan of the
    config sources, so the list is drawn only for the page itself, once the choices are known."""
    from hydra.core.global_hydra import GlobalHydra

    choices = _choices(_root_)
    if not choices:
        return ""
    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in sorted(g for g in loader.list_groups("") if g not in _HIDDEN):
        options = _options(loader, group)
        if options:
            note = f" ({_MULTI[group]})" if group in _MULTI else ""
            lines.append(f"  {group}{note}: {_marked(options, choices.get(group))}")
    launchers = _options(loader, "hydra/launcher")
    lines.append(f"  hydra/launcher (with -m; torchrun also without): {_marked(launchers, choices.get('hydra/launcher'))}")
    return "\n".join(lines)


def _options(loader, group: str) -> List[str]:
    from hydra.core.object_type import ObjectType

    return sorted(loader.get_group_options(group, results_filter=ObjectType.CONFIG))


def _choices(root: Any) -> Dict[str, Set[str]]:
    """The options this command composed: ``hydra.runtime.choices``, and ``logger``'s list from its flags
    ({} while composing)."""
    from ds_hydra.tracking.config import chosen_trackers

    try:
        chosen = {group: {str(option)} for group, option in root.hydra.runtime.choices.items()}
    except Exception:  # no config to read (the resolver called elsewhere)
        return {}
    if chosen:
        chosen["logger"] = {"jsonl", *chosen_trackers(root.logger)}  # several options: not among Hydra's choices
    return chosen


def _marked(options: List[str], chosen: Optional[Set[str]]) -> str:
    return ", ".join(f"{o}*" if o in (chosen or ()) else o for o in options)
