"""The settings of ``hydra/launcher=torchrun`` and the torchrun arguments they make (torch-free: Hydra's
plugin discovery imports this through the launcher's config)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence


@dataclass
class TorchrunSettings:
    """The settings of ``hydra/launcher=torchrun`` (the plugin's config adds its ``_target_``)."""

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

    @classmethod
    def from_config(cls, launcher_cfg: Any) -> "TorchrunSettings":
        """From the composed ``hydra.launcher`` node (or the launcher's keyword arguments)."""
        names = cls.__dataclass_fields__
        values = {k: launcher_cfg[k] for k in names if k in launcher_cfg}
        values["extra_args"] = [str(a) for a in values.get("extra_args") or []]
        return cls(**{k: (str(v) if k in ("nproc_per_node", "nnodes") else v) for k, v in values.items()})

    def problems(self) -> List[str]:
        """Every bad setting, one line each, naming the key."""
        out = []
        if not (self.nproc_per_node in ("auto", "gpu", "cpu") or (self.nproc_per_node.isdigit() and int(self.nproc_per_node) > 0)):
            out.append(f"hydra.launcher.nproc_per_node={self.nproc_per_node}: allowed values: auto, gpu, cpu or a number >= 1")
        if self.max_restarts < 0:
            out.append(f"hydra.launcher.max_restarts={self.max_restarts}: must be >= 0")
        if self.several_nodes and not self.rdzv_endpoint:
            out.append(f"hydra.launcher.nnodes={self.nnodes}: several nodes meet at hydra.launcher.rdzv_endpoint=<host:port>; set it")
        if self.several_nodes and self.standalone:
            out.append(f"hydra.launcher.standalone=true: one node only, but hydra.launcher.nnodes={self.nnodes}")
        return out

    @property
    def several_nodes(self) -> bool:
        return self.nnodes.split(":")[-1] != "1"

    def args(self, job_key: str) -> List[str]:
        """torchrun's arguments for one job; ``job_key`` makes each job's rendezvous id its own."""
        args = [f"--nproc_per_node={self._nproc()}", f"--max_restarts={self.max_restarts}"]
        standalone = self.standalone if self.standalone is not None else not (self.several_nodes or self.rdzv_endpoint)
        if standalone:
            args.append("--standalone")  # a free port on this machine, a fresh id
        else:
            args += [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}", f"--rdzv_backend={self.rdzv_backend}",
                     f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={self.rdzv_id or 'ds_hydra'}-{job_key}"]
        return args + list(self.extra_args)

    def _nproc(self) -> str:
        if self.nproc_per_node != "auto":
            return self.nproc_per_node
        import torch

        return str(torch.cuda.device_count() or 1)  # every GPU; one process on a CPU-only machine

    def world_size(self) -> int:
        """How many ranks a job gets: ``nnodes`` (the upper end of an elastic ``MIN:MAX``) x processes per node."""
        per_node = self.nproc_per_node
        if per_node in ("auto", "gpu"):
            per_node = self._nproc() if per_node == "auto" else str(_gpus() or 1)
        elif per_node == "cpu":
            per_node = str(os.cpu_count() or 1)  # torchrun's meaning of cpu: a process per CPU
        nodes = self.nnodes.split(":")[-1]
        return int(nodes) * int(per_node) if nodes.isdigit() and per_node.isdigit() else 1


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


_LAUNCHER_CHOICE = re.compile(r"^(?:\+\+|\+)?hydra/launcher=(.*)$")
_LAUNCHER_KEY = re.compile(r"^(?:\+\+|\+)?hydra\.launcher\.(nproc_per_node|nnodes)=(.*)$")


def launcher_world_size(overrides: Sequence[str]) -> int:
    """``run_world_size`` of a command line, read before Hydra composes (for ``deepspeed_config=``, whose
    batch triple depends on it): ``hydra/launcher=torchrun`` and its ``hydra.launcher.*`` overrides."""
    choice = [m.group(1).strip("'\"") for a in overrides if (m := _LAUNCHER_CHOICE.match(a))]
    given = {m.group(1): m.group(2).strip("'\"") for a in overrides if (m := _LAUNCHER_KEY.match(a))}
    return run_world_size(choice[-1] if choice else None, given)


def run_world_size(launcher: Optional[str], launcher_cfg: Any) -> int:
    """The ranks a run gets, by one rule for the command line and the tasks: a launcher's environment
    where one started this process (torchrun, the deepspeed launcher: WORLD_SIZE); else, with
    ``hydra/launcher=torchrun`` (``launcher`` is the chosen option's name), its ``nnodes x nproc_per_node``
    (``launcher_cfg``: the ``hydra.launcher`` node or its overrides); else one process."""
    from ds_hydra.common import launch_env

    if launch_env.launched():
        return launch_env.world_size()
    if launcher == "torchrun":
        return TorchrunSettings.from_config(launcher_cfg).world_size()
    return 1
