"""Load a checkpoint into a freshly built trainer (any engine, any number of ranks: run it under torchrun)
and write the state the trainer then holds, gathered, as one ``full`` file::

    python -m torch.distributed.run --nproc_per_node=3 tests/dcp_load_probe.py OUT CHECKPOINT OVERRIDES...

What the sharded-checkpoint tests compare, bit for bit, with the checkpoint itself.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import compose  # noqa: E402

from ds_hydra.training.state import atomic_torch_save  # noqa: E402
from ds_hydra.training.trainer import Trainer  # noqa: E402

out, checkpoint, *overrides = sys.argv[1:]
trainer = Trainer(compose(overrides), Path(out).parent / "probe_run")
try:
    trainer.load(Path(checkpoint))
    state = trainer.state_dict()  # every rank takes part in gathering it
    if trainer.engine.is_main:
        atomic_torch_save(state, Path(out))
finally:
    trainer.engine.close()
