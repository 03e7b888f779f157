"""Hydra plugin: ds_hydra's config groups in any Hydra app, under the ``ds_hydra/`` prefix."""
