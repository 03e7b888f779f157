"""Non-finite (NaN or inf) losses: found without a host sync per step, never saved.

Reading a CUDA loss on the host (``.item()``) stalls the CPU until the GPU catches up, so the trainer
reads losses only every ``trainer.log_interval`` steps. ``NonFiniteWatch.observe`` keeps, on the
loss's device, the first step whose loss was not finite (a few tiny kernels, no sync), and
``check`` reads it wherever the loop syncs anyway: at each log line, before each evaluation, and
before every checkpoint is written. A diverged run therefore never saves its broken state: it stops
with ``NonFiniteLoss`` naming the first bad step and the last good checkpoint.

``trainer.skip_nonfinite=N`` instead drops the update of a step whose loss is not finite (at most N
times in a run), which needs the loss on the host before ``optimizer.step``: one sync per step,
only when N > 0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ds_hydra.errors import UserError

EXIT_DIVERGED = 3


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; nothing after the last good checkpoint was saved."""

    exit_code = EXIT_DIVERGED

    def __init__(self, value: float, step: int, last_good: Optional[Path], run_dir: Path, skipped: int = 0):
        self.step = step
        self.last_good = last_good
        kept = f"the last good checkpoint is {last_good} (nothing later was saved)" if last_good is not None else "nothing was saved"
        skips = f" after skipping {skipped} non-finite steps (trainer.skip_nonfinite)" if skipped else ""
        super().__init__(
            f"loss is {value} at step {step}{skips}; {kept}. Lower optimizer.lr, "
            f"set trainer.grad_clip, or allow a few bad batches with trainer.skip_nonfinite=N; "
            f"then continue with resume={run_dir} or start a new run"
        )


class NonFiniteWatch:
    """Remembers, on the loss's device, the first step whose loss was not finite, and its value."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_value = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of optimizer step ``step`` (1-based); device-side only, no host sync."""
        if loss.device.type == "cpu":
            # The CPU runs ops eagerly, so reading the value costs nothing to wait for, and one
            # Python check is cheaper than the few tensor ops below (which matter on small models).
            if self.first_step.item() < 0 and not math.isfinite(loss.item()):
                self.first_step.fill_(step)
                self.first_value.fill_(loss.item())
            return
        new = ~torch.isfinite(loss.detach().float()) & (self.first_step < 0)
        self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
        self.first_value = torch.where(new, loss.detach().float(), self.first_value)

    def first_bad_step(self) -> Optional[int]:
        """The first non-finite step seen, or None (one host sync)."""
        step = int(self.first_step.item())
        return step if step >= 0 else None

    def check(self, last_good: Optional[Path], run_dir: Path, skipped: int = 0) -> None:
        """Raise ``NonFiniteLoss`` if any observed loss was not finite (one host sync)."""
        step = self.first_bad_step()
        if step is not None:
            raise NonFiniteLoss(float(self.first_value.item()), step, last_good, run_dir, skipped)
