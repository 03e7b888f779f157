"""Engines: how many processes train and what syncs them (single process, DDP, FSDP2, DeepSpeed).

``start_engine(cfg.engine, device)`` picks the engine once and returns it, its process group up;
everything else asks the engine (``ds_hydra.engine.base.Engine``). The schemas (``config``) import no
torch; the engines themselves are imported when started. Launching processes is the CLI's
(``ds_hydra.cli.launch``); DeepSpeed's JSON config is ``ds_hydra.deepspeed``.
"""
from __future__ import annotations

from importlib import import_module

# engine.name -> "module:class"
ENGINES = {
    "single": "ds_hydra.engine.base:Engine",
    "ddp": "ds_hydra.engine.ddp:DDPEngine",
    "fsdp": "ds_hydra.engine.fsdp:FSDPEngine",
    "deepspeed": "ds_hydra.engine.deepspeed_engine:DeepSpeedEngine",
}


def resolve_engine(name: str) -> str:
    """``auto`` -> ``ddp`` when a launcher started several processes, else ``single``."""
    from ds_hydra.common.launch_env import multi_process

    if name == "auto":
        return "ddp" if multi_process() else "single"
    return name


def start_engine(engine_cfg, device):
    """The engine ``engine_cfg.name`` asks for, started on ``device`` (see ``Engine.start``)."""
    name = resolve_engine(getattr(engine_cfg.name, "value", engine_cfg.name))
    module, _, cls = ENGINES[name].partition(":")
    return getattr(import_module(module), cls).start(engine_cfg, device)


__all__ = ["ENGINES", "resolve_engine", "start_engine"]
