"""``engine=ddp``: torch DistributedDataParallel. Every rank holds the whole model; gradients are
all-reduced in buckets during backward, once per optimizer step."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ds_hydra.engine.base import ProcessGroupEngine


class DDPEngine(ProcessGroupEngine):
    name = "ddp"

    def wrap(self, model: nn.Module, blocks: Sequence[nn.Module], autocast_dtype: Optional[torch.dtype]) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.engine_cfg.bucket_cap_mb,
            find_unused_parameters=self.engine_cfg.find_unused_parameters,
            gradient_as_bucket_view=self.engine_cfg.gradient_as_bucket_view,
        )
        return self.ddp

    def micro_batch(self, last: bool):
        """No all-reduce on all but the last micro-batch of a step (``no_sync``): accumulation costs one
        all-reduce per step, as in one process."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()
