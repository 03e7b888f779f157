"""Convert a checkpoint between the two formats, in one process (no process group, no training)::

    python -m ds_hydra.training.checkpoint_convert outputs/<run>/checkpoints/step_0000100      # dcp -> step_0000100.pt
    python -m ds_hydra.training.checkpoint_convert outputs/<run>/checkpoints/step_0000100.pt   # full -> step_0000100/

The result is written beside the source (or at ``--out``), atomically, and resumes exactly as the
source does: ``full`` is one file holding one process's state dict (what ``torch.load`` users and
older tools read), ``dcp`` is a torch.distributed.checkpoint directory that loads on any number of
ranks. Both keep the step, schedule, data position, rank 0's generators and the config. A dcp
checkpoint is read whole into this process's memory (its model and optimizer state must fit).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from ds_hydra.errors import UserError
from ds_hydra.optim.state_format import named_optimizer_state

log = logging.getLogger(__name__)

__all__ = ["convert_checkpoint", "main"]


def convert_checkpoint(source: Path, out: Optional[Path] = None) -> Path:
    """Write ``source`` (a ``step_N.pt`` file or a ``step_N/`` directory) in the other format; returns the path."""
    from ds_hydra.training import sharded_checkpoint
    from ds_hydra.training import state as state_io

    source = Path(source)
    if state_io.is_sharded_checkpoint(source):
        full = sharded_checkpoint.read_full_state(source)
        target = Path(out) if out is not None else source.parent / f"{source.name}.pt"
        _refuse_existing(target)
        state_io.atomic_torch_save(full, target)
        return target
    if source.is_dir():
        raise UserError(f"{source}: not a complete sharded checkpoint (no .metadata or trainer_state.pt)")
    full = state_io.load_train_state(source)
    if "deepspeed_checkpoint" in full["optimizer"]:
        raise UserError(
            f"{source}: written by engine=deepspeed, whose optimizer state is in DeepSpeed's own checkpoint "
            f"(checkpoints/deepspeed/); its weights load as they are (ds_hydra.load_model, task=export_hf)"
        )
    names = full.get("param_names")
    if not names:
        raise UserError(
            f"{source}: has no parameter names for its optimizer state (written before ds_hydra recorded them); "
            f"resume it once with trainer.checkpoint_format=dcp instead"
        )
    target = Path(out) if out is not None else source.with_suffix("")
    _refuse_existing(target)
    return sharded_checkpoint.write_sharded(full, named_optimizer_state(full["optimizer"], names), target)


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise UserError(f"{target}: already exists; delete it or give another --out")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ds_hydra.training.checkpoint_convert",
        description="Convert a ds_hydra checkpoint between full (step_N.pt) and dcp (step_N/).",
    )
    parser.add_argument("source", help="a checkpoints/step_N.pt file or a checkpoints/step_N directory")
    parser.add_argument("--out", default=None, help="where to write (default: beside the source, the other format's name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        target = convert_checkpoint(Path(args.source), Path(args.out) if args.out else None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s", target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
