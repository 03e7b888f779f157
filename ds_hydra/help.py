"""``python -m ds_hydra --help``: the tasks, the user's config groups and their options, without the
internal ``schema/*`` groups Hydra would list beside them (conf/hydra/help/ds_hydra.yaml is the page;
``${ds_hydra.config_groups:}`` fills in the groups). Torch-free.

The CLI draws the page itself (``print_help``): one composition, then each group's options read from
one repository. Hydra's own ``--help`` also lists every group for template variables this page does
not use, deep-copying the whole config repository (every schema in the ConfigStore) for each group and
option: 6-7 s against the 0.8 s of ``--cfg job``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set

# Groups the page does not list: the schemas the option YAMLs extend, and Hydra's own (but the launchers).
_HIDDEN = ("schema", "hydra")
# Launchers ds_hydra knows, and how to get one this install does not have.
_LAUNCHER_SOURCES = {
    "torchrun": "ds_hydra's own; found where ds_hydra is installed from a wheel or with "
                "pip install -e . --config-settings editable_mode=strict",
    "joblib": "pip install 'ds-hydra[sweeps]'",
    "submitit_local": "pip install 'ds-hydra[sweeps]'",
    "submitit_slurm": "pip install 'ds-hydra[sweeps]'",
}
# Groups that take several options at once.
_MULTI = {"logger": "several at once: 'logger=[jsonl,csv,tensorboard,wandb,mlflow]'"}


def config_groups(_root_: Any = None) -> str:
    """One line per group: its options, the default marked with ``*``; then Hydra's launchers.

    Composition merges into ``hydra.help`` before the command's choices exist, which evaluates the
    page's interpolations; listing every group's options there would cost every run a scan of the
    config sources, so the list is drawn only for the page itself, once the choices are known."""
    from hydra.core.global_hydra import GlobalHydra

    from hydra.core.object_type import ObjectType

    choices = _choices(_root_)
    if not choices:
        return ""
    # The loader's repository, read as it is: loader.get_group_options deep-copies it on every call.
    repository = GlobalHydra.instance().config_loader().repository
    groups = repository.get_group_options("", results_filter=ObjectType.GROUP)
    lines = []
    for group in sorted(g for g in groups if g not in _HIDDEN):
        options = _options(repository, group)
        if options:
            note = f" ({_MULTI[group]})" if group in _MULTI else ""
            lines.append(f"  {group}{note}: {_marked(options, choices.get(group))}")
    launchers = _options(repository, "hydra/launcher")
    lines.append(f"  hydra/launcher (with -m; torchrun also without): {_marked(launchers, choices.get('hydra/launcher'))}")
    missing = [f"{name} ({how})" for name, how in _LAUNCHER_SOURCES.items() if name not in launchers]
    if missing:
        lines.append(f"    not in this install: {'; '.join(missing)}")
    return "\n".join(lines)


def tasks(_root_: Any = None) -> str:
    """The ``task`` values, this command's marked with ``*``."""
    from omegaconf import OmegaConf

    try:
        task = _root_.task
        values = [t.value for t in OmegaConf.get_type(_root_, "task")]  # the schema's Task enum
    except Exception:  # no config to read
        return ""
    return ", ".join(f"{v}*" if v == task.value else v for v in values)


def print_help(config_path: str, overrides: Sequence[str]) -> None:
    """The ``--help`` page for ``overrides`` (the choices they make are marked): one composition."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    if config_path.startswith("pkg://"):
        context = initialize_config_module(config_module=config_path[len("pkg://"):], version_base=None, job_name="ds_hydra")
    else:
        context = initialize_config_dir(config_dir=config_path, version_base=None, job_name="ds_hydra")
    with context:
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        print(cfg.hydra.help.template)


def _options(repository, group: str) -> List[str]:
    from hydra.core.object_type import ObjectType

    return sorted(repository.get_group_options(group, results_filter=ObjectType.CONFIG))


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
