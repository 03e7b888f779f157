"""Schema of the ``lm_eval`` section (torch-free): which harness tasks to run, and how.

The names follow the harness's own command line (``lm_eval --tasks --num_fewshot --limit --batch_size
--include_path --seed``) and LitGPT's ``litgpt evaluate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import List, Optional


@dataclass
class LMEvalConfig:
    tasks: List[str] = field(default_factory=list)
    """Harness task (or group) names, e.g. [hellaswag, arc_easy] or the names of tasks in include_path."""
    num_fewshot: Optional[int] = None
    """Examples placed before each question; null: each task's own default (usually 0)."""
    limit: Optional[float] = None
    """Documents per task: a count (>= 1), or a fraction of each task below 1.0; null: all of them (for
    debugging and quick checks: the harness warns that limited numbers are not comparable)."""
    batch_size: int = 8
    """Sequences per forward pass (loglikelihood and perplexity requests) and prompts per generation batch."""
    include_path: Optional[str] = None
    """A folder of the harness's own task YAMLs (e.g. dataset_path: json with local data_files) to run
    beside, or instead of, the built-in tasks; tasks found here are looked up without indexing the built-ins."""
    seed: int = 1234
    """Seeds the harness's Python, NumPy and torch generators and its few-shot sampler: same seed, same prompts."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for the standard errors of metrics that are not means (perplexity, BLEU; the
    harness's default); 0 skips those standard errors, which saves minutes on small machines."""
    max_length: Optional[int] = None
    """Longest sequence a forward pass sees (contexts are cut from the left); null: the model's maximum
    positions (block_size, max_position_embeddings), else the sequence length the run trained on."""
    max_gen_toks: int = 256
    """New tokens a generation request may produce when its task does not say (generate_until tasks)."""
    allow_download: bool = False
    """false: the Hugging Face Hub and datasets are offline while tasks load (HF_HUB_OFFLINE,
    HF_DATASETS_OFFLINE), so a task whose data is not on this machine stops with one line naming its
    dataset; true: the harness may download task datasets."""
    after_training: bool = False
    """task=train: run these tasks on the final checkpoint when training ends and add their metrics
    (named <task>/<metric>, e.g. arc_easy/acc) to the run's final metrics, the trackers and the sweep report."""


def validate_lm_eval(cfg, task: str = "train", prefix: str = "lm_eval") -> List[str]:
    """Range checks; the task list is required only when tasks will run."""
    problems = []
    runs = task == "lm_eval" or (task in ("train", "resume") and cfg.after_training)
    why = "task=lm_eval" if task == "lm_eval" else f"{prefix}.after_training=true"
    if runs and not cfg.tasks:
        problems.append(f"{prefix}.tasks is empty: {why} needs harness task names, e.g. '{prefix}.tasks=[arc_easy]'")
    if runs and task != "lm_eval" and find_spec("lm_eval") is None:  # found before training, not after it
        problems.append(f"{why}: the lm-evaluation-harness is not installed: pip install 'ds-hydra[eval]'")
    if cfg.limit is not None and not cfg.limit > 0:
        problems.append(
            f"{prefix}.limit={cfg.limit}: must be a document count >= 1 or a fraction in (0, 1), or null for every document"
        )
    elif cfg.limit is not None and cfg.limit > 1 and cfg.limit != int(cfg.limit):
        problems.append(f"{prefix}.limit={cfg.limit}: above 1 it counts documents, so it must be a whole number")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        problems.append(f"{prefix}.num_fewshot={cfg.num_fewshot}: must be >= 0, or null for each task's default")
    if cfg.bootstrap_iters < 0:
        problems.append(f"{prefix}.bootstrap_iters={cfg.bootstrap_iters}: must be >= 0 (0: no bootstrap standard errors)")
    for key in ("batch_size", "max_gen_toks"):
        if cfg[key] < 1:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 1")
    if cfg.max_length is not None and cfg.max_length < 2:
        problems.append(f"{prefix}.max_length={cfg.max_length}: must be >= 2, or null for the model's maximum positions")
    return problems


__all__ = ["LMEvalConfig", "validate_lm_eval"]
