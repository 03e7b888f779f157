"""Sweeps: a Hydra callback that records every job of a multirun and writes one summary report.

``python -m ds_hydra -m optimizer=adam,sgd ckpt.segments=1,2,4`` runs six jobs; at the end the
sweep directory holds ``sweep_summary.csv``, ``sweep_summary.md`` and ``sweep_summary.png``.
Torch-free: Hydra instantiates the callback before any job runs.
"""
from ds_hydra.sweeps.callback import ActiveSweep, Objective, SweepOutcome, SweepSummary, select_objective
from ds_hydra.sweeps.records import JOB_RECORD_FILE, collect_job_records
from ds_hydra.sweeps.report import SUMMARY_FILES, write_sweep_report

__all__ = [
    "ActiveSweep",
    "JOB_RECORD_FILE",
    "Objective",
    "SUMMARY_FILES",
    "SweepOutcome",
    "SweepSummary",
    "collect_job_records",
    "select_objective",
    "write_sweep_report",
]
