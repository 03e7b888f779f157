"""``python -m ds_hydra`` whose checkpoint shard writes each take ``SLOW_WRITE_S`` seconds longer (in
torch.distributed.checkpoint's writer, so the background write of ``trainer.async_checkpoint`` is long
enough to be interrupted on purpose)::

    SLOW_WRITE_S=3 python tests/slow_checkpoint_writes.py ARGS...
"""
import os
import runpy
import sys
import time

from torch.distributed.checkpoint.filesystem import FileSystemWriter

_write_data = FileSystemWriter.write_data


def slow_write_data(self, plan, planner):
    time.sleep(float(os.environ.get("SLOW_WRITE_S", "3")))
    return _write_data(self, plan, planner)


FileSystemWriter.write_data = slow_write_data
sys.argv = ["ds_hydra", *sys.argv[1:]]
runpy.run_module("ds_hydra", run_name="__main__", alter_sys=True)
