"""The torchrun launcher: Hydra calls ``launch`` with each batch of a sweep's jobs; each job runs under
torchrun in its own job dir, one after the other (every job uses all the processes it is given)."""
import logging
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class TorchrunLauncher(Launcher):
    def __init__(self, **torchrun: Any) -> None:
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.torchrun = torchrun  # the hydra.launcher settings (config.py)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _core  # imports ds_hydra only when a sweep launches

        return _core.launch(self, job_overrides, initial_job_idx)
