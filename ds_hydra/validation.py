"""Checks of a composed config that types cannot express; every problem is collected, then raised once."""
from __future__ import annotations

from typing import List

from ds_hydra.activation_checkpointing.config import validate_ckpt
from ds_hydra.data.config import validate_data
from ds_hydra.errors import ConfigError
from ds_hydra.models.config import validate_model
from ds_hydra.optim.config import validate_optimizer, validate_scheduler
from ds_hydra.training.config import validate_trainer


def config_problems(cfg) -> List[str]:
    """Every range and cross-field problem of ``cfg``, one message each, naming the key."""
    problems: List[str] = []
    problems += validate_model(cfg.model)
    problems += validate_data(cfg.data)
    problems += validate_trainer(cfg.trainer)
    problems += validate_optimizer(cfg.optimizer)
    if cfg.trainer.max_steps >= 1:  # else schedule lengths interpolated from it would only echo that problem
        problems += validate_scheduler(cfg.scheduler, max_steps=cfg.trainer.max_steps)
    problems += validate_ckpt(cfg.ckpt, n_blocks=cfg.model.n_layer)
    return problems


def validate_config(cfg) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
