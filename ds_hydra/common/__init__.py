"""The bottom layer: torch-free helpers every other package may use, importing nothing of ds_hydra's
above them (``ds_hydra.errors`` only).

* ``files``: atomic file writes (text, bytes, JSON);
* ``checkpoint_files``: where a run keeps its checkpoints and how they are named;
* ``run_dir``: where a run writes (Hydra's output dir, else a fresh ``outputs/<time>``), claimed exclusively;
* ``run_lock``: one writer per run (or sweep, or prepare output) directory, stale locks taken over;
* ``signals``: stop on SIGTERM/SIGUSR1/Ctrl-C, the exit codes that say why;
* ``launch_env``: this process's rank, world size and local rank as a launcher set them;
* ``overrides``: Hydra override quoting and command-line scanning;
* ``startup``: the one ``StartUp`` per command: what Hydra's callbacks settle for the task and ``cli_main``;
* ``remote_code``: a local Hugging Face directory that needs its own Python code, refused;
* ``terminal``: log lines beside a progress bar, and records for the run's log file only.
"""
