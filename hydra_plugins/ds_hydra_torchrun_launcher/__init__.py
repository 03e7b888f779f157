"""Hydra launcher plugin: each job of a run or a sweep under torchrun (``hydra/launcher=torchrun``)."""
