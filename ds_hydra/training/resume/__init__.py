"""Continue an interrupted run exactly where it stopped, and skip the jobs of a sweep that finished.

``python -m ds_hydra resume=outputs/<date>/<time>`` (or ``task=resume resume=...``) re-runs the run's
saved overrides (``<run>/.hydra/overrides.yaml``) in its own directory (``hydra.run.dir=<run>``),
with any extra overrides of the new command applied last; ``train`` then loads the newest checkpoint
and continues. ``resume=<run>/checkpoints/step_NNNNNNN.pt`` continues from that checkpoint instead;
newer checkpoints and their metrics are first moved into ``checkpoints/superseded_<time>/``.

What makes a resumed run equal, bit for bit, to one that was never interrupted:

* the checkpoint holds every piece of state the next step reads (``Trainer.state_dict``);
* ``metrics.jsonl`` keeps only the records up to the checkpoint's step: the interrupted tail is
  recomputed, so no record is duplicated;
* a new run refuses a directory that already holds a run, so nothing is overwritten by accident.

A finished ``train`` writes ``completed.json`` (its final metrics and config). Re-running a multirun
into the same ``hydra.sweep.dir`` skips every job whose directory holds that marker for the same
config (returning the saved metrics, so sweep reports stay complete) and continues every job that
left a checkpoint.

One module per job: ``command_line`` (``resume=`` to the run's own overrides and directory, before
Hydra), ``start_plan`` (where ``train`` starts; refusing to start over a run), ``config_diff`` (what
changed since the checkpoint), ``metrics_tail`` (dropping the interrupted tail, setting newer
checkpoints aside), ``completion`` (the completion marker) and ``torchrun_restart`` (torchrun's
restarted workers continue their run, found by its directory). Torch-free: the CLI imports it first.
"""

from ds_hydra.training.resume.command_line import (
    HYDRA_FILE,
    ONE_SHOT_KEYS,
    OVERRIDES_FILE,
    expand_resume_args,
    locate_run,
    read_saved_overrides,
)
from ds_hydra.training.resume.completion import (
    COMPLETED_FILE,
    COMPLETED_FORMAT,
    clear_completion_marker,
    read_completion_marker,
    write_completion_marker,
)
from ds_hydra.training.resume.config_diff import VOLATILE_KEYS, Difference, config_differences, flat_config
from ds_hydra.training.resume.metrics_tail import METRICS_FILE, continue_from, set_aside_newer, truncate_metrics
from ds_hydra.training.resume.start_plan import (
    StartPlan,
    check_compatible,
    in_multirun,
    plan_start,
    record_continuation,
    resume_target,
)

__all__ = [
    "COMPLETED_FILE",
    "COMPLETED_FORMAT",
    "HYDRA_FILE",
    "METRICS_FILE",
    "ONE_SHOT_KEYS",
    "OVERRIDES_FILE",
    "VOLATILE_KEYS",
    "Difference",
    "StartPlan",
    "check_compatible",
    "clear_completion_marker",
    "config_differences",
    "continue_from",
    "expand_resume_args",
    "flat_config",
    "in_multirun",
    "locate_run",
    "plan_start",
    "read_completion_marker",
    "read_saved_overrides",
    "record_continuation",
    "resume_target",
    "set_aside_newer",
    "truncate_metrics",
    "write_completion_marker",
]
