"""``hydra/launcher=torchrun``: the launcher's settings, registered in Hydra's ConfigStore (imports only Hydra).

    python -m ds_hydra -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=2 optimizer.lr=1e-3,2e-3
"""
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.ds_hydra_torchrun_launcher.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: str = "auto"
    """Processes (ranks) per node for each job: a number, gpu, cpu, or auto (every GPU; 1 on a CPU-only machine)."""
    nnodes: str = "1"
    """Nodes per job, or an elastic range MIN:MAX. Several nodes: run the same sweep command on each node,
    with the same hydra.sweep.dir on a shared filesystem and a rdzv_endpoint they all reach."""
    node_rank: int = 0
    """This node's rank (static rendezvous only; c10d assigns ranks itself)."""
    rdzv_backend: str = "c10d"
    """torchrun's rendezvous backend (several nodes)."""
    rdzv_endpoint: str = ""
    """host:port where the nodes of a job meet (several nodes)."""
    rdzv_id: Optional[str] = None
    """Rendezvous id prefix; each job meets under <rdzv_id>-<job number> (null: ds_hydra)."""
    standalone: Optional[bool] = None
    """torchrun --standalone: a local rendezvous on a free port (null: when nnodes is 1 and no rdzv_endpoint is set)."""
    max_restarts: int = 0
    """Restart a job's ranks this many times after a failure; each restart continues the job from its checkpoint."""
    extra_args: List[str] = field(default_factory=list)
    """More torchrun arguments, as given, e.g. ['--monitor_interval=1']."""


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="ds_hydra")
