"""Optimizers, param groups and learning-rate schedules (imported lazily: they need torch)."""
