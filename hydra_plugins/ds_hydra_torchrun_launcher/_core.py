"""What the torchrun launcher does for each job: Hydra's job config and callbacks here, the ranks under torchrun."""
import copy
import logging
import os
from pathlib import Path
from typing import List, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import open_dict, read_write

from hydra.plugins.launcher import Launcher  # the TorchrunLauncher that calls in here (its module imports this one)

log = logging.getLogger(__name__)


def launch(launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    from ds_hydra.cli.torchrun_config import TorchrunSettings
    from ds_hydra.cli.torchrun_job import SweepStopped
    from ds_hydra.errors import ConfigError
    from ds_hydra.common.signals import stop_requested

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    settings = TorchrunSettings.from_config(launcher.torchrun)
    if settings.problems():
        raise ConfigError(settings.problems())
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("torchrun launcher: %d jobs, each on %s processes per node; sweep dir %s", len(job_overrides), settings.nproc_per_node, sweep_dir)
    returns: List[JobReturn] = []
    for offset, overrides in enumerate(job_overrides):
        signum = stop_requested()
        if signum:  # asked to stop while the previous job ran: start no more (re-running the sweep continues it)
            raise SweepStopped(signum, initial_job_idx + offset, initial_job_idx + len(job_overrides), sweep_dir)
        log.info("\t#%d : %s", initial_job_idx + offset, " ".join(filter_overrides(overrides)))
        returns.append(run_one(launcher, initial_job_idx + offset, list(overrides), settings, sweep_dir))
    return returns


def run_one(launcher: Launcher, num: int, overrides: List[str], settings, sweep_dir: Path) -> JobReturn:
    """One job: its config and ``on_job_start`` here, its ranks under torchrun, ``on_job_end`` with the outcome."""
    from ds_hydra.cli.torchrun_job import JobFailed, job_arguments, run_job
    from ds_hydra.sweeps.callback import select_objective
    from ds_hydra.tracking.naming import JOB_NUM_ENV, SWEEP_DIR_ENV

    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config):
        config.hydra.job.id = f"{config.hydra.job.name}_{num}"
        config.hydra.job.num = num
    HydraConfig.instance().set_config(config)
    job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(job_dir)
    HydraConfig.instance().set_config(config)
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    ret = JobReturn(overrides=overrides, cfg=task_cfg, hydra_cfg=copy.deepcopy(config), working_dir=os.getcwd(),
                    task_name=config.hydra.job.name)
    launcher.hydra_context.callbacks.on_job_start(config=config, task_function=launcher.task_function)
    args = job_arguments(overrides, list(config.hydra.overrides.hydra), job_dir, continue_existing=True)
    outcome = run_job(settings, job_dir, args, job_key=str(num),
                      env={SWEEP_DIR_ENV: str(sweep_dir.absolute()), JOB_NUM_ENV: str(num)})
    if outcome.completed:
        try:  # the objective, if any, carries every metric to the sweep report
            ret.return_value = select_objective(task_cfg, outcome.metrics or {})
            ret.status = JobStatus.COMPLETED
        except Exception as exc:  # objective= names no metric the job returned
            ret.return_value, ret.status = exc, JobStatus.FAILED
    else:
        ret.return_value = JobFailed(outcome.error, outcome.exit_code)
        ret.status = JobStatus.FAILED
    launcher.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
    return ret
