"""``hydra/launcher=torchrun``: the launcher's settings, registered in Hydra's ConfigStore.

    python -m ds_hydra -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=2 optimizer.lr=1e-3,2e-3

The settings and their docs are ds_hydra's (``ds_hydra.cli.torchrun_config``, torch-free); this
adds the launcher class Hydra instantiates.
"""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from ds_hydra.cli.torchrun_config import TorchrunSettings


@dataclass
class TorchrunLauncherConf(TorchrunSettings):
    _target_: str = "hydra_plugins.ds_hydra_torchrun_launcher.torchrun_launcher.TorchrunLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="ds_hydra")
