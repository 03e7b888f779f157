"""``task=import_deepspeed deepspeed_config=<ds_config.json>``: the overrides the file maps to, written as
an ``experiment`` preset into the run dir (headed by the command that runs it, each key commented with
the DeepSpeed key it comes from) and printed; nothing is trained."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ds_hydra.deepspeed.command_line import deepspeed_installed
from ds_hydra.deepspeed.json_import import Imported, Override, import_deepspeed_config, read_deepspeed_json
from ds_hydra.errors import UserError

EXPERIMENT_DIR = "experiment"  # under the run dir: <run dir>/experiment/<name>.yaml

def import_task(cfg, run_dir: Optional[Path] = None, imported: Optional[Imported] = None) -> Dict[str, Any]:
    """``task=import_deepspeed``: write the file's overrides as an experiment preset into the run dir and
    print them; train nothing. ``imported``: what the command line's ``deepspeed_config`` mapped to
    (the CLI's); without it the file is mapped again here."""
    from hydra.core.hydra_config import HydraConfig

    from ds_hydra.common.run_dir import resolve_run_dir

    value = cfg.get("deepspeed_config")
    if not value:
        raise UserError("task=import_deepspeed: name the DeepSpeed config to import, deepspeed_config=<ds_config.json>")
    imported = imported or import_deepspeed_config(
        read_deepspeed_json(value), value, world_size=job_world_size(), deepspeed_available=deepspeed_installed())
    run_dir = resolve_run_dir(run_dir)
    others = []
    if HydraConfig.initialized():
        own = set(imported.override_texts)
        others = [o for o in HydraConfig.get().overrides.task
                  if o not in own and not o.lstrip("+").startswith(("task=", "deepspeed_config=", "hydra."))]
    path = write_experiment(imported, run_dir, others)
    command = " ".join(["python -m ds_hydra", *(shlex.quote(o) for o in [*imported.override_texts, *others])])
    print(f"# {path}: run it with\n#   {run_command(path, others)}\n# or pass the overrides directly:\n{command}")
    return {"experiment": str(path), "overrides": imported.override_texts}


def job_world_size() -> int:
    """The ranks this job's run gets, by the rule the command line uses (``run_world_size``): the launch
    environment's, else the composed ``hydra/launcher=torchrun``'s ``nnodes x nproc_per_node``, else 1."""
    from hydra.core.hydra_config import HydraConfig

    from ds_hydra.cli.torchrun_config import run_world_size

    if not HydraConfig.initialized():
        return run_world_size(None, {})
    hydra_cfg = HydraConfig.get()
    return run_world_size(hydra_cfg.runtime.choices.get("hydra/launcher"), hydra_cfg.launcher)


def experiment_name(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem) or "deepspeed"
    return stem if stem[0].isalpha() else f"ds_{stem}"


def run_command(experiment: Path, others: Sequence[str] = ()) -> str:
    """The shell command that runs the preset (with the import command's other overrides)."""
    config_dir = experiment.parent.parent
    return " ".join(["python -m ds_hydra", f"--config-dir {shlex.quote(str(config_dir))}",
                     f"experiment={experiment.stem}", *(shlex.quote(o) for o in others)])


def write_experiment(imported: Imported, run_dir: Path, others: Sequence[str] = ()) -> Path:
    """``<run dir>/experiment/<name>.yaml``: the imported overrides as a ``# @package _global_`` preset,
    headed by the command that runs it; each key's comment names the DeepSpeed key it comes from."""
    from ds_hydra.common.files import atomic_write_text

    path = Path(run_dir) / EXPERIMENT_DIR / f"{experiment_name(imported.path)}.yaml"
    groups = [o for o in imported.overrides if "." not in o.key]
    tree: Dict[str, Any] = {}
    for o in imported.overrides:
        if "." in o.key:
            node = tree
            *parents, leaf = o.key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = o
    lines = [
        "# @package _global_",
        f"# DeepSpeed config {imported.path} (world size {imported.world_size}), imported by ds_hydra task=import_deepspeed.",
        f"# {run_command(path, others)}",
        "# (or copy this file into conf/experiment/ and run: python -m ds_hydra experiment=" + path.stem + ")",
        "defaults:",
        *[f"  - override /{o.key}: {o.value}  # {o.source}" for o in groups],
        "  - _self_",
    ]
    lines += _yaml_lines(tree, 0)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _yaml_lines(node: Dict[str, Any], depth: int) -> List[str]:
    lines = []
    pad = "  " * depth
    for key, value in node.items():
        if isinstance(value, Override):
            lines.append(f"{pad}{key}: {json.dumps(value.value)}  # {value.source}")
        else:
            lines.append(f"{pad}{key}:")
            lines += _yaml_lines(value, depth + 1)
    return lines


__all__ = ["Imported", "import_deepspeed_config", "expand_deepspeed_config_args", "read_deepspeed_json",
           "import_task", "log_import", "write_experiment", "hydra_value"]
