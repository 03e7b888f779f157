"""A Hydra app that is not ds_hydra: it reuses ds_hydra's config groups through the search-path plugin.

    python tests/foreign_app/app.py                       # prints the composed config as JSON
    python tests/foreign_app/app.py ds_hydra/optimizer@optimizer=sgd optimizer.momentum=0.5
"""
import json

import hydra
from omegaconf import OmegaConf


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg) -> None:
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    # the schema each node was composed against: ds_hydra's dataclasses, registered by the plugin
    out["schemas"] = {key: OmegaConf.get_type(cfg[key]).__name__ for key in ("model", "optimizer", "scheduler", "trainer")}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
