"""A model target that fails on one rank only (allowed with ``allowed_targets=[failing_model]``)."""
import os

from ds_hydra.models.gpt import GPT


def gpt_failing_on_rank_1(**kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("planted failure on rank 1")
    return GPT(**kwargs)
