"""``python -m ds_hydra``: the command line (``ds_hydra.cli.main``)."""
from ds_hydra.cli import main

if __name__ == "__main__":
    main()
