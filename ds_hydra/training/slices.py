"""The slices of a run's config that components take, cut in one place: the engine's ``Optimization``,
the data's ``data`` and ``tokenizer`` configs with ``model.pretrained``, and what the trackers record.
A component never reads the whole config (tests/test_architecture.py holds it)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

from ds_hydra.data.base import TokenData, build_data

if TYPE_CHECKING:
    from ds_hydra.engine.base import Optimization
    from ds_hydra.tracking.session import TrackedRun


def run_data(cfg) -> TokenData:
    """The data of the run config ``cfg`` (built once per process, see ``build_data``)."""
    pretrained = (cfg.get("model", None) or {}).get("pretrained", None)
    return build_data(cfg.data, cfg.get("tokenizer", None), pretrained)


def vocab_size_of(cfg) -> Tuple[int, str]:
    """(the model's vocabulary size, where it comes from): ``model.vocab_size``, else the data's
    ``vocab_size`` setting, else the data's own (built, and cached, to learn it)."""
    if cfg.model.get("vocab_size", None):
        return int(cfg.model.vocab_size), "model.vocab_size"
    if cfg.data.get("vocab_size", None):
        return int(cfg.data.vocab_size), "data.vocab_size"
    return int(run_data(cfg).vocab_size), f"from {cfg.data._target_.rsplit('.', 1)[-1]}"


def optimization_of(cfg) -> "Optimization":
    """What the engine builds the optimizer and schedule from, and the shape of a step."""
    from ds_hydra.engine.base import Optimization

    tcfg = cfg.trainer
    return Optimization(
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        param_groups=cfg.get("param_groups"),
        in_backward=bool(tcfg.get("optimizer_in_backward", False)),
        batch_size=int(tcfg.batch_size),
        grad_accum_steps=int(tcfg.grad_accum_steps),
        grad_clip=float(tcfg.grad_clip),
        activation_checkpointing=cfg.ckpt,
    )


def tracked_run(cfg) -> "TrackedRun":
    """What the metrics logger's trackers are given: the ``logger`` config, the run's ``name``, and the
    resolved config as plain data (resolved only when a tracker records it)."""
    from omegaconf import OmegaConf

    from ds_hydra.tracking.config import chosen_trackers
    from ds_hydra.tracking.session import TrackedRun

    logger = cfg.get("logger", None)
    config = {}
    if logger is not None and chosen_trackers(logger):
        config = OmegaConf.to_container(cfg, resolve=True)
        config.pop("hydra", None)
    return TrackedRun(logger=logger, name=cfg.get("name", None), config=config)
