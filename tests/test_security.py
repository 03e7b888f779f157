"""Data is never code (README "Security model"): every door through which a run directory, a model or
tokenizer directory, a saved override list or a `_target_` could run code is tried with a planted payload.

Each payload's effect is a file: a marker it would create, a victim file it would truncate, a directory a
launched job would make. Each test checks that the command failed with exit 2 and one `ds_hydra: error:`
line naming what was refused, and that the file shows nothing ran. One test per door runs in the default
suite; the variations are marked slow. The command-line doors run ``cli_main`` in this process
(``conftest.cli_in_process``: a payload that ran would leave its file all the same); the ones that answer
transformers' prompt on stdin run ``python -m ds_hydra``.
"""
from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import REPO, TINY, cli_in_process, compose, run_cli
from ds_hydra.errors import UserError

PACKAGE = REPO / "ds_hydra"


class Payload:
    """Unpickling this object creates ``marker`` (``exec`` of one line): the proof that a pickle was trusted."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def refused(proc, *expected: str) -> str:
    """The command failed in one `ds_hydra: error:` line holding each of ``expected``; returns that line."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ds_hydra: error:")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # nothing follows it
    for piece in expected:
        assert piece in errors[0], errors[0]
    return errors[0]


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


# -- 1. a run directory rebuilds only ds_hydra's model builders (and today's allowed_targets) ---------------


def planted_run(tmp_path: Path) -> Path:
    """A run directory as someone could hand it over: its config "rebuilds the model" with ds_hydra's torchrun
    launcher, whose arguments start a job (making ``job/`` and ``job_run/``) with a callback that unpickles
    ``notes.pt``; it widens its own allowlist; its checkpoint and ``notes.pt`` are pickles that run code."""
    run = tmp_path / "copied_run"
    (run / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "marker"
    torch.save(Payload(marker), run / "notes.pt")
    torch.save({"model": Payload(marker), "step": 1}, run / "checkpoints" / "step_0000001.pt")
    saved = yaml.safe_load(OmegaConf.to_yaml(compose(["model=gpt_tiny"]), resolve=True))
    saved["allowed_targets"] = ["ds_hydra", "torch", "builtins"]  # a run directory cannot widen the allowlist
    saved["model"] = {
        "_target_": "ds_hydra.cli.torchrun_job.run_job",
        "settings": {"_target_": "ds_hydra.cli.torchrun_config.TorchrunSettings", "nproc_per_node": "1"},
        "job_dir": str(tmp_path / "job"),  # run_job makes job/rank_reports before it starts torchrun
        "job_key": "x",
        "args": [
            f"+hydra.callbacks.evil={{_target_:torch.load,f:{run / 'notes.pt'},weights_only:false}}",
            *TINY,
            "trainer.max_steps=1",
            f"hydra.run.dir={tmp_path / 'job_run'}",
        ],
    }
    (run / "config_resolved.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    return run


def nothing_ran(tmp_path: Path) -> None:
    assert not (tmp_path / "marker").exists()
    assert not (tmp_path / "job").exists() and not (tmp_path / "job_run").exists()


RUN_REFUSAL = "config_resolved.yaml: model._target_=ds_hydra.cli.torchrun_job.run_job: not an allowed target"


@pytest.mark.parametrize(
    "task",
    ["infer", pytest.param("eval", marks=pytest.mark.slow), pytest.param("export_hf", marks=pytest.mark.slow)],
)
def test_a_run_directory_cannot_rebuild_its_model_as_a_launcher(tmp_path, task):
    run = planted_run(tmp_path)
    proc = cli_in_process([f"task={task}", f"inference.checkpoint={run}", f"hydra.run.dir={tmp_path / 'out'}"])
    refused(proc, RUN_REFUSAL, "as model ds_hydra builds only ds_hydra.models.gpt.GPT, ds_hydra.models.hf.causal_lm")
    nothing_ran(tmp_path)


def test_load_model_uses_todays_allowed_targets_never_the_runs(tmp_path):
    from ds_hydra.inference.loading import load_model

    run = planted_run(tmp_path)
    with pytest.raises(UserError, match=RUN_REFUSAL):
        load_model(run)
    nothing_ran(tmp_path)

    config = run / "config_resolved.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["model"] = {"_target_": "collections.OrderedDict"}  # the user's "own" builder
    saved["allowed_targets"] = ["collections"]
    config.write_text(yaml.safe_dump(saved))
    with pytest.raises(UserError, match=r"model\._target_=collections\.OrderedDict: not an allowed target .*allowed_targets=\[collections\]"):
        load_model(run)  # the run's own list does not count
    with pytest.raises(UserError, match=r"returned a OrderedDict, not a torch.nn.Module"):
        load_model(run, allowed_targets=["collections"])  # today's list does: built (and found not to be a model)
    nothing_ran(tmp_path)


def test_a_run_directory_does_not_choose_where_its_data_is_cached(tmp_path, monkeypatch):
    """A copied-in run's ``data.cache_dir`` would make task=infer/eval and load_model write the tokenized corpus
    (and its ``path``: any file it names) into a directory of the run's choosing; today's cache is used instead."""
    pytest.importorskip("tokenizers", reason="the run trains a BPE tokenizer (the tokenizers extra)")
    from ds_hydra.inference.loading import load_model
    from ds_hydra.models.build import build_model
    from ds_hydra.training.slices import run_data

    mine, elsewhere = tmp_path / "my_cache", tmp_path / "elsewhere"
    monkeypatch.setenv("DS_HYDRA_CACHE", str(mine))
    cfg = compose(["model=gpt_tiny", "tokenizer=bpe", "tokenizer.vocab_size=300", f"data.cache_dir={tmp_path / 'trained'}"])
    model = build_model(cfg.model, run_data(cfg).vocab_size)
    run = tmp_path / "copied_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 1}, run / "checkpoints" / "step_0000001.pt")
    saved = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    saved["data"]["cache_dir"] = str(elsewhere)
    (run / "config_resolved.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")

    loaded = load_model(run)
    assert torch.equal(loaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    assert not elsewhere.exists()
    assert any(mine.rglob("tokenizer.json"))  # cached where today's settings say


# -- 2. Hydra's own keys: callbacks pass the allowlist; a saved run never sets hydra.* -----------------------


@pytest.mark.parametrize(
    "callback",
    [
        "{_target_:builtins.open,file:VICTIM,mode:w}",
        pytest.param("{_target_:torch.load,f:NOTES,weights_only:false}", marks=pytest.mark.slow),
        pytest.param("{_target_:ds_hydra.training.state.safe_torch_load,path:NOTES}", marks=pytest.mark.slow),
    ],
    ids=["open-truncates", "torch-load", "ds_hydra-loader"],
)
def test_a_hydra_callback_on_the_command_line_passes_the_allowlist_first(tmp_path, callback):
    target = victim(tmp_path)
    torch.save(Payload(tmp_path / "marker"), tmp_path / "notes.pt")
    callback = callback.replace("VICTIM", str(target)).replace("NOTES", str(tmp_path / "notes.pt"))
    proc = cli_in_process([*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"+hydra.callbacks.evil={callback}"])
    name = callback.split(",")[0].split(":", 1)[1]
    refused(proc, f"hydra.callbacks.evil._target_={name}: not an allowed target")
    assert target.read_text() == "precious\n" and not (tmp_path / "marker").exists()
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory


@pytest.mark.slow
def test_a_hydra_callback_in_a_sweep_passes_the_allowlist_first(tmp_path):
    target = victim(tmp_path)
    proc = run_cli(
        ["-m", *TINY, "trainer.max_steps=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"+hydra.callbacks.evil={{_target_:builtins.open,file:{target},mode:w}}"]
    )
    refused(proc, "hydra.callbacks.evil._target_=builtins.open: not an allowed target")
    assert target.read_text() == "precious\n" and not (tmp_path / "sweep").exists()


def test_callbacks_ds_hydra_ships_and_the_users_own_pass():
    from ds_hydra.instantiate import hydra_callback_problems

    assert hydra_callback_problems(compose([], return_hydra_config=True)) == []  # Preflight, SweepSummary
    mine = "+hydra.callbacks.mine={_target_:collections.OrderedDict}"
    [problem] = hydra_callback_problems(compose([mine], return_hydra_config=True))
    assert "hydra.callbacks.mine._target_=collections.OrderedDict: not an allowed target" in problem
    assert hydra_callback_problems(compose([mine, "allowed_targets=[collections]"], return_hydra_config=True)) == []


def test_the_check_stands_in_front_of_hydras_callbacks_only_while_the_app_runs(tmp_path):
    import hydra._internal.hydra as hydra_app

    from ds_hydra.errors import ConfigError
    from ds_hydra.instantiate import hydra_callbacks_checked

    original = hydra_app.Callbacks
    target = victim(tmp_path)
    evil = compose([f"+hydra.callbacks.evil={{_target_:builtins.open,file:{target},mode:w}}"], return_hydra_config=True)
    with hydra_callbacks_checked():
        with pytest.raises(ConfigError, match="hydra.callbacks.evil._target_=builtins.open: not an allowed target"):
            hydra_app.Callbacks(evil)
        built = hydra_app.Callbacks(compose([], return_hydra_config=True))
    assert type(built) is original and [type(c).__name__ for c in built.callbacks] == ["Preflight", "SweepSummary"]
    assert hydra_app.Callbacks is original and target.read_text() == "precious\n"


def planted_overrides(tmp_path: Path, *lines: str) -> Path:
    """A run directory whose saved overrides (``.hydra/overrides.yaml``) were edited after the run."""
    run = tmp_path / "shared_run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=gpt_tiny", "trainer.max_steps=2", *lines]))
    return run


@pytest.mark.parametrize(
    "line, expected",
    [
        ("+hydra.callbacks.evil={_target_:builtins.open,file:VICTIM,mode:w}", "which sets Hydra itself"),
        pytest.param("hydra/launcher=torchrun", "holds hydra/launcher=torchrun, which sets Hydra itself",
                     marks=pytest.mark.slow),
        pytest.param("--config-dir=EVIL", "a command-line flag, not an override", marks=pytest.mark.slow),
        pytest.param("allowed_targets=[builtins]", "may not widen the _target_ allowlist", marks=pytest.mark.slow),
    ],
    ids=["callback", "launcher", "flag", "allowlist"],
)
def test_resume_never_replays_hydra_keys_or_flags_from_a_run_directory(tmp_path, line, expected):
    target = victim(tmp_path)
    evil = tmp_path / "evil_conf"
    evil.mkdir()
    (evil / "config.yaml").write_text(f"hydra:\n  callbacks:\n    evil:\n      _target_: builtins.open\n      file: {target}\n      mode: w\n")
    run = planted_overrides(tmp_path, line.replace("VICTIM", str(target)).replace("EVIL", str(evil)))
    before = sorted(p.name for p in run.rglob("*"))
    refused(cli_in_process([f"resume={run}"]), f"{run / '.hydra' / 'overrides.yaml'}: ", expected)
    assert target.read_text() == "precious\n"
    assert sorted(p.name for p in run.rglob("*")) == before  # the run directory is left as it was


@pytest.mark.parametrize(
    "line",
    ["+model@hydra.callbacks.evil=gpt_tiny", "+trainer@hydra.job_logging=default", "optimizer@hydra=adamw",
     "+model@a:hydra.launcher=gpt_tiny"],
)
def test_a_saved_override_cannot_put_a_config_group_under_hydra_through_its_package(tmp_path, line):
    """``group@package=option`` sets the keys at ``package``: a saved line whose package is ``hydra.*`` sets Hydra
    itself (its callbacks, its logging), though its key is a group of ds_hydra's."""
    from ds_hydra.training.resume.command_line import expand_resume_args

    run = planted_overrides(tmp_path, line)
    (run / "config_resolved.yaml").write_text(yaml.safe_dump({"task": "train"}))
    with pytest.raises(UserError, match=rf"overrides.yaml: holds {re.escape(line)}, which sets Hydra itself"):
        expand_resume_args([f"resume={run}"])
    assert expand_resume_args([f"resume={planted_overrides(tmp_path / 'plain', '+model@model=gpt_tiny')}"])


def test_resume_never_takes_a_harness_task_folder_from_a_run_directory(tmp_path):
    """A harness task YAML can import Python from its folder (``!function utils.f``); a saved
    ``lm_eval.include_path`` with ``lm_eval.after_training=true`` would run the run directory's own code."""
    from ds_hydra.training.resume.command_line import expand_resume_args

    tasks = tmp_path / "shared_run" / "tasks"
    line = f"lm_eval.include_path={tasks}"
    run = planted_overrides(tmp_path, "lm_eval.after_training=true", "lm_eval.tasks=[evil]", line)
    (run / "config_resolved.yaml").write_text(yaml.safe_dump({"task": "train"}))
    tasks.mkdir()
    (tasks / "utils.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w').close()\ndef docs(d):\n    return d\n")
    (tasks / "evil.yaml").write_text("task: evil\ndataset_path: json\nprocess_docs: !function utils.docs\n")
    with pytest.raises(UserError, match=rf"overrides.yaml: sets {re.escape(line)}, a folder of harness task YAMLs, .* "
                                        rf"repeat {re.escape(line)} on the resume command"):
        expand_resume_args([f"resume={run}"])
    assert not (tmp_path / "marker").exists()
    assert line in expand_resume_args([f"resume={run}", line])  # the user's own folder, named today


@pytest.mark.slow
def test_resume_takes_only_a_plain_config_name_from_a_run_directory(tmp_path):
    run = planted_overrides(tmp_path)
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"config_name": "../../../tmp/evil/config"}}}))
    refused(run_cli([f"resume={run}"]), "hydra.yaml: names the primary config '../../../tmp/evil/config', which is not a plain config name")


def test_hydras_rerun_of_a_pickled_config_is_refused(tmp_path):
    pickled = tmp_path / "config.pickle"
    pickled.write_bytes(__import__("pickle").dumps(Payload(tmp_path / "marker")))
    refused(cli_in_process(["--experimental-rerun", str(pickled)]), "--experimental-rerun: unpickles a saved config file")
    assert not (tmp_path / "marker").exists()


# -- 3. a Hugging Face directory never runs its own code ---------------------------------------------------


def remote_code_dir(tmp_path: Path, auto_map: bool = True) -> Path:
    """A model directory whose config.json and tokenizer_config.json point at its own Python files, each of
    which creates ``marker`` when imported."""
    folder = tmp_path / "hub_model"
    folder.mkdir()
    marker = tmp_path / "marker"
    config = {"model_type": "evil_arch", "architectures": ["EvilForCausalLM"], "vocab_size": 65}
    tokenizer_config = {"tokenizer_class": "EvilTokenizer"}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.slow  # imports transformers in a new process
def test_a_model_directory_that_needs_its_own_code_is_refused_without_a_prompt(tmp_path):
    pytest.importorskip("transformers")
    folder = remote_code_dir(tmp_path)
    # stdin says yes to any question; ds_hydra must not ask one
    proc = run_cli([*TINY, "model=hf_causal_lm", f"model.pretrained={folder}", f"hydra.run.dir={tmp_path / 'run'}"],
                   input="y\n" * 20, timeout=240)
    refused(proc, f"model.pretrained={folder}: {folder / 'config.json'} maps AutoConfig, AutoModelForCausalLM to Python "
                  "code in that directory (auto_map)", "trust_remote_code=False")
    assert "custom code" not in proc.stdout + proc.stderr  # transformers' prompt never showed
    assert not (tmp_path / "marker").exists()


@pytest.mark.slow
def test_a_tokenizer_directory_that_needs_its_own_code_is_refused_without_a_prompt(tmp_path):
    pytest.importorskip("transformers")
    folder = remote_code_dir(tmp_path)
    (folder / "config.json").unlink()  # a tokenizer directory: its tokenizer_config.json names the code
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 50)
    proc = run_cli(["task=prepare", "tokenizer=hf", f"tokenizer.path={folder}", f"prepare.input={text}",
                    f"prepare.output={tmp_path / 'tokens'}", f"hydra.run.dir={tmp_path / 'run'}"], input="y\n" * 20, timeout=240)
    refused(proc, f"tokenizer.path={folder}: {folder / 'tokenizer_config.json'} maps AutoTokenizer to Python code")
    assert "custom code" not in proc.stdout + proc.stderr
    assert not (tmp_path / "marker").exists()


def test_an_architecture_transformers_does_not_ship_is_refused_before_transformers_reads_it(tmp_path):
    from ds_hydra.common.remote_code import refuse_remote_code

    folder = remote_code_dir(tmp_path, auto_map=False)
    with pytest.raises(UserError, match=r"model\.pretrained=x: .*config\.json has model_type=evil_arch, which transformers does not ship"):
        refuse_remote_code(folder, "model.pretrained=x", known_model_types=["llama", "gpt2"])
    refuse_remote_code(folder, "tokenizer.path=x")  # a tokenizer directory: no auto_map, nothing to refuse
    assert not (tmp_path / "marker").exists()


def call_name(node: ast.Call) -> str:
    """``a.b.c`` for a call of ``a.b.c(...)`` (the innermost names only)."""
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword_is(node: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords)


@functools.lru_cache(maxsize=1)
def package_trees() -> Tuple[Tuple[str, ast.AST], ...]:
    """``(file, parsed module)`` of every module of ds_hydra and its Hydra plugins."""
    paths = [*PACKAGE.rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]
    return tuple((str(p.relative_to(REPO)), ast.parse(p.read_text(encoding="utf-8"))) for p in paths)


def package_calls() -> List[tuple]:
    """``(file, line, dotted name, call node)`` of every call in ds_hydra and its Hydra plugins."""
    return [(f, node.lineno, call_name(node), node) for f, tree in package_trees() for node in ast.walk(tree)
            if isinstance(node, ast.Call)]


def transformers_loader(name: str) -> bool:
    """A transformers call that can import a directory's code: an Auto* class's or transformers.X's
    from_pretrained/from_config, or pipeline()."""
    parts = name.split(".")
    loads = parts[-1] in ("from_pretrained", "from_config") and (parts[0] == "transformers" or any(p.startswith("Auto") for p in parts))
    return loads or parts[-1] == "pipeline"


def test_every_transformers_loader_call_passes_trust_remote_code_false():
    calls = [(f, line, name, node) for f, line, name, node in package_calls() if transformers_loader(name)]
    assert [(f, line, name) for f, line, name, node in calls if not keyword_is(node, "trust_remote_code", False)] == []
    assert {name.split(".")[-2] for *_, name, _ in calls} >= {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"}  # the scan sees them


def test_a_directory_that_maps_its_own_code_is_refused_before_transformers_reads_it(tmp_path):
    from ds_hydra.common.remote_code import refuse_remote_code

    folder = remote_code_dir(tmp_path)
    with pytest.raises(UserError, match=r"^model\.pretrained=x: .*config\.json maps AutoConfig, AutoModelForCausalLM to Python code"):
        refuse_remote_code(folder, "model.pretrained=x", known_model_types=["llama"])
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"^tokenizer\.path=x: .*tokenizer_config\.json maps AutoTokenizer to Python code"):
        refuse_remote_code(folder, "tokenizer.path=x")
    assert not (tmp_path / "marker").exists()


# -- 5. pickles: torch.load only with weights_only=True ----------------------------------------------------

# Loaders of pickles that are not torch.load(weights_only=True), each with why it cannot run code.
PICKLE_EXCEPTIONS = {
    # a pickle.Unpickler whose find_class refuses every class: dicts, lists, strings and numbers only
    ("ds_hydra/data/tokens.py", "_PlainUnpickler"),
    # DCP's .metadata index: a pickle.Unpickler whose find_class admits DCP's metadata classes, torch dtypes and
    # paths only (every global DCP writes), refusing any other class or function
    ("ds_hydra/training/sharded_checkpoint.py", "_MetadataUnpickler"),
}
# torch.distributed.checkpoint's own FileSystemReader unpickles .metadata with pickle.load, and its converters
# (dcp_to_torch_save) load through it: every DCP load goes through sharded_checkpoint._reader's subclass.
DCP_UNSAFE = ("FileSystemReader", "dcp_to_torch_save", "torch_save_to_dcp", "_load_state_dict_from_keys")


def test_torch_load_only_with_weights_only_true_everywhere():
    calls = package_calls()
    unsafe = [(f, line) for f, line, name, node in calls if name == "torch.load" and not keyword_is(node, "weights_only", True)]
    assert unsafe == []
    assert any(name == "torch.load" for _, _, name, _ in calls)  # the scan sees ds_hydra's own torch.load
    pickles = sorted({(f, name) for f, _, name, _ in calls
                      if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load")
                      or name.endswith("Unpickler")} - PICKLE_EXCEPTIONS)
    assert pickles == []
    numpy_pickles = [(f, line) for f, line, name, node in calls if name in ("np.load", "numpy.load") and keyword_is(node, "allow_pickle", True)]
    assert numpy_pickles == []
    dcp_readers = [(f, line, name) for f, line, name, _ in calls if name.rsplit(".", 1)[-1] in DCP_UNSAFE]
    assert dcp_readers == []  # _reader subclasses it (its read_metadata replaced), never calls it
    dcp_loads = [(f, line) for f, line, name, node in calls if name.endswith(("dcp.load", "dcp.load_state_dict"))
                 and not any(k.arg == "storage_reader" and ast.unparse(k.value).startswith("_reader(") for k in node.keywords)]
    assert dcp_loads == []


def test_no_module_imports_torch_load_under_another_name():
    offenders = []
    for path, tree in package_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization", "pickle"):
                offenders += [f"{path}: from {node.module} import {a.name}" for a in node.names
                              if a.name in ("load", "loads", "Unpickler")]
    assert offenders == []


# -- 4. '+key' additions are held to the schema like any other key -----------------------------------------


# (through the command line: test_bad_input.py, "typo added with +")
@pytest.mark.parametrize(
    "override, expected",
    [
        ("+logger.csvv=true", "logger.csvv: unknown key (did you mean 'csv'?)"),
        ("+logger.wandb.projekt=x", "logger.wandb.projekt: unknown key (did you mean 'project'?)"),
        ("+trainer.max_stepz=3", "trainer.max_stepz: unknown key (did you mean 'max_steps'?)"),
        ("+objectiv=val_loss", "objectiv: unknown key (did you mean 'objective'?)"),
        ("+scheduler.warmup_stepz=3", "scheduler.warmup_stepz: unknown key (did you mean 'warmup_steps'?)"),
    ],
)
def test_plus_additions_outside_a_schema_are_unknown_keys(override, expected):
    from ds_hydra.validation import added_key_problems

    assert [p for p in added_key_problems(compose([override])) if p.startswith(expected)]


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer=adamw", "+optimizer.maximize=true"],  # open: bound to the optimizer class's signature
        ["model=hf_llama", "+model.config.rope_theta=10000.0"],  # a Dict field: the architecture checks its keys
        ["model=custom", "model._target_=my_models.build_model", "+model.width=32"],  # no schema: the builder's own
        ["engine=deepspeed", "++engine.extra.wall_clock_breakdown=true"],  # engine.extra: DeepSpeed's JSON
    ],
)
def test_schemas_open_on_purpose_stay_open(overrides):
    from ds_hydra.config_store import OPEN_SCHEMAS
    from ds_hydra.validation import added_key_problems
    from ds_hydra.optim.config import OptimizerConfig

    assert added_key_problems(compose(overrides)) == []
    assert OptimizerConfig in OPEN_SCHEMAS and "signature" in OptimizerConfig.OPEN_KEYS  # the schema says so


@pytest.mark.slow  # imports deepspeed
def test_deepspeeds_checkpoint_loader_reads_weights_only_while_ds_hydra_resumes(tmp_path):
    """DeepSpeed's own loader unpickles with weights_only=False; ds_hydra's resume swaps it for a weights_only
    load that admits DeepSpeed's few plain-data classes and nothing else."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from ds_hydra.deepspeed.checkpoint_loading import weights_only_loads

    class CheckpointEngine:
        def load(self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)  # what DeepSpeed does

    class Engine:
        checkpoint_engine = CheckpointEngine()

    evil, good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload(tmp_path / "marker")}}, evil)
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0)}, "module": {"w": torch.ones(2)}}, good)
    engine = Engine()
    with weights_only_loads(engine):
        with pytest.raises(UserError, match=r"optim_states\.pt: refused: loading it would call exec"):
            engine.checkpoint_engine.load(str(evil), map_location=torch.device("cpu"))
        loaded = engine.checkpoint_engine.load(str(good))
    assert loaded["optimizer_state_dict"]["loss_scaler"].cur_scale == 1.0 and torch.equal(loaded["module"]["w"], torch.ones(2))
    assert not (tmp_path / "marker").exists()
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method is back after the resume


def test_a_deepspeed_json_sets_values_never_interpolations():
    """Hydra resolves ``${...}`` inside quoted override values: a JSON string ``${oc.env:SECRET}`` would copy the
    environment into the run's saved config, and ``${oc.create:{_target_:...}}`` would build a node to instantiate."""
    from ds_hydra.deepspeed.json_import import import_deepspeed_config
    from ds_hydra.errors import ConfigError

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": "${oc.create:{_target_:builtins.open,file:VICTIM,mode:w}}"}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "nvme_path": "${oc.env:HOME}"}},
    }
    with pytest.raises(ConfigError) as refused_json:
        import_deepspeed_config(config, path="ds.json")
    lines = str(refused_json.value).splitlines()
    assert any(line.strip().startswith("- deepspeed_config=ds.json: optimizer.params.lr='${oc.create:") and
               "an interpolation" in line for line in lines), lines
    assert any("zero_optimization.offload_optimizer.nvme_path='${oc.env:HOME}': an interpolation" in line for line in lines), lines
    config["optimizer"]["params"]["lr"] = 3e-4
    config["zero_optimization"]["offload_optimizer"]["nvme_path"] = "/local_nvme"
    assert import_deepspeed_config(config, path="ds.json").overrides  # plain values pass


@pytest.mark.parametrize("shard", ["/etc/hostname", "../../other_run/checkpoints/step_0000001/__0_0.distcp", ".."])
def test_a_sharded_checkpoint_reads_only_the_shards_beside_its_index(tmp_path, shard):
    """DCP opens each shard at the ``relative_path`` its ``.metadata`` names: an index naming a path outside its
    directory would read another run's (or any) file into the model."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    from ds_hydra.training.sharded_checkpoint import read_metadata

    checkpoint = tmp_path / "step_0000001"
    checkpoint.mkdir()
    index = lambda name: Metadata(state_dict_metadata={}, storage_data={MetadataIndex("model.w"): _StorageInfo(name, 0, 8)})  # noqa: E731
    (checkpoint / ".metadata").write_bytes(pickle.dumps(index(shard)))
    with pytest.raises(UserError, match=rf"\.metadata: names the shard file '{re.escape(shard)}', outside its own directory"):
        read_metadata(checkpoint)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(index("__0_0.distcp")))
    assert read_metadata(checkpoint).storage_data[MetadataIndex("model.w")].relative_path == "__0_0.distcp"


def test_a_model_directory_index_reads_no_file_outside_it(tmp_path):
    """A model directory is data: its safetensors index naming a file outside the directory (absolute or
    ..) is refused in one line before anything is read."""
    from ds_hydra.errors import UserError
    from ds_hydra.models.quantized_load import safetensors_names

    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not weights")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for named in (str(secret), "../secret.safetensors"):
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": named}}))
        with pytest.raises(UserError, match="outside its own directory"):
            safetensors_names(model_dir)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part-1.safetensors"}}))
    with pytest.raises(UserError, match="names part-1.safetensors, missing from"):
        safetensors_names(model_dir)
    (model_dir / "part-1.safetensors").write_bytes(b"")
    assert safetensors_names(model_dir) == {"w": model_dir / "part-1.safetensors"}
