"""Docs name what exists: every ``ds_hydra.x.y`` name, repository file path and ``python -m`` module that
the README, a module's docstrings or its comments name is in the tree today; every config key the README
names (``trainer.grad_accum_steps``) is a key of a schema; every lazily exported name is where its package
says.

Modules move (``training/fit.py`` became ``training/seq_vocab.py``, DeepSpeed's JSON export left
``engine/``), and a docstring that still names the old place sends a reader to nothing. Names are
resolved by reading the source (ast), never by importing it: no torch, no optional extra, well under a
second.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("ds_hydra", "hydra_plugins", "bench")

# ds_hydra.x.y, but not an OmegaConf resolver (``${ds_hydra.fraction:...}``) nor a file name (ds_hydra.log)
DOTTED = re.compile(r"(?<![\w.$/{-])ds_hydra(?:\.[A-Za-z_]\w*)+(?![\w:/-])")
NOT_NAMES = {"ds_hydra.log"}
# modules that are another module's object under a second name (``sys.modules[__name__] = ...``)
ALIASES = {"ds_hydra.checkpointing": "ds_hydra.deepspeed.checkpointing"}
# a path inside this repository: under one of its top-level folders, or inside the ds_hydra package
# (``training/seq_vocab.py``); external paths (nanoGPT's ``data/shakespeare_char/prepare.py``) are skipped
# by leaving out the folders other projects share with ours (``data/``, ``tests/unit/``...) below.
PATH = re.compile(r"(?<![\w./<>-])((?:[A-Za-z_][\w-]*/)+[\w-]+\.(?:py|yaml|md|sh|json|jsonl))\b")
TOP_DIRS = ("ds_hydra/", "hydra_plugins/", "bench/", "tests/", "conf/", "docs/", ".ci/")
PYTHON_M = re.compile(r"python -m (ds_hydra[\w.]*)")


def source_files() -> List[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def doc_texts(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, text) of every docstring (a field's, under it, too) and comment of a Python file."""
    source = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def module_file(dotted: str) -> Optional[Path]:
    """The file of module ``dotted`` in this checkout (``ds_hydra.conf`` is the top-level ``conf/``)."""
    parts = dotted.split(".")
    base = REPO / "conf" if parts[:2] == ["ds_hydra", "conf"] else REPO / parts[0]
    rest = parts[2:] if parts[:2] == ["ds_hydra", "conf"] else parts[1:]
    here = base.joinpath(*rest)
    for candidate in (here.with_suffix(".py") if rest else None, here / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def defined_names(path: Path) -> dict:
    """Top-level names of a module (defs, classes, assignments, imports, lazily exported names), each
    mapped to its class body's names when it is a class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: dict = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = None
        elif isinstance(node, ast.ClassDef):
            members: Set[str] = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
            names[node.name] = members
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = None
            if isinstance(node.value, ast.Dict):  # lazily exported names: {"name": "module"}
                names.update({k.value: None for k in node.value.keys
                              if isinstance(k, ast.Constant) and isinstance(k.value, str)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
        elif isinstance(node, (ast.If, ast.Try)):  # guarded imports and definitions
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    names.update({(a.asname or a.name).split(".")[0]: None for a in inner.names})
                elif isinstance(inner, (ast.FunctionDef, ast.ClassDef)):
                    names.setdefault(inner.name, None)
    return names


def resolves(dotted: str) -> bool:
    """Whether ``ds_hydra.a.b.c`` names a module of this checkout, or a name (or a class's member) in one."""
    for alias, module in ALIASES.items():
        if dotted.startswith(alias + "."):
            dotted = module + dotted[len(alias):]
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        names = defined_names(path)
        if rest[0] not in names:
            return False
        members = names[rest[0]]
        return len(rest) == 1 or members is None or rest[1] in members
    return False


def path_exists(path: str, tracked_dir: Path) -> Optional[bool]:
    """Whether a path named in a doc exists: from the repository root, or inside the ds_hydra package;
    None when it is not ours to check (another project's path)."""
    if path.startswith(TOP_DIRS):
        return (REPO / path).exists()
    first = path.split("/", 1)[0]
    if (REPO / "ds_hydra" / first).is_dir() and first not in ("data",):
        return (REPO / "ds_hydra" / path).exists() or (tracked_dir / path).exists()
    return None


def stale_names(text: str, where: str, line: int = 1, tracked_dir: Path = REPO / "ds_hydra") -> List[str]:
    """Every name or path in ``text`` that is not in the tree, as ``where:line: name``."""
    stale = []
    for match in DOTTED.finditer(text):
        name = match.group(0)
        if name not in NOT_NAMES and not resolves(name):
            stale.append(f"{where}:{line}: {name}")
    for match in PATH.finditer(text):
        if path_exists(match.group(1), tracked_dir) is False:
            stale.append(f"{where}:{line}: {match.group(1)}")
    return stale


def test_names_and_paths_in_docstrings_and_comments_exist():
    stale = []
    for path in source_files():
        for line, text in doc_texts(path):
            stale += stale_names(text, str(path.relative_to(REPO)), line, path.parent)
    assert not stale, "docs name what is not in the tree:\n" + "\n".join(stale)


def test_names_and_paths_in_the_shipped_configs_comments_exist():
    stale = []
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "#" in line:
                stale += stale_names(line.split("#", 1)[1], str(path.relative_to(REPO)), n)
    assert not stale, "config comments name what is not in the tree:\n" + "\n".join(stale)


def test_names_and_paths_in_the_readme_exist():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    stale = [s for n, line in enumerate(text.splitlines(), 1) for s in stale_names(line, "README.md", n)]
    assert not stale, "README names what is not in the tree:\n" + "\n".join(stale)


def test_python_m_modules_in_the_readme_and_docstrings_run():
    texts = [(REPO / "README.md").read_text(encoding="utf-8")]
    texts += [t for p in source_files() for _, t in doc_texts(p)]
    modules = {m for text in texts for m in PYTHON_M.findall(text)}
    assert "ds_hydra.config_reference" in modules  # the scan sees them
    for module in sorted(modules):
        path = module_file(module)
        assert path is not None, f"python -m {module}: no such module"
        runnable = (path.parent / "__main__.py").is_file() if path.name == "__init__.py" \
            else '__name__ == "__main__"' in path.read_text(encoding="utf-8")
        assert runnable, f"python -m {module}: the module has no main"


def test_the_layout_names_every_bench_script():
    """README's Layout lists bench/'s scripts: a new benchmark is named there."""
    layout = (REPO / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    bench = layout.split("bench/", 1)[1].split("outputs/", 1)[0]
    scripts = sorted(p.name for p in (REPO / "bench").iterdir() if p.suffix in (".py", ".sh"))
    assert scripts and [s for s in scripts if s not in bench] == []


GROUPS_CHECKED = ("model", "data", "tokenizer", "prepare", "scheduler", "param_groups", "loss", "adapter", "ckpt",
                  "trainer", "logger", "run", "inference", "lm_eval", "engine")


def reference_keys() -> dict:
    """``{group: its keys}`` from docs/config_reference.md (generated from the schemas, kept current by
    tests/test_config_reference.py): every option's schema of a group together."""
    keys: dict = {}
    group = None
    for line in (REPO / "docs" / "config_reference.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            group = line[3:].strip()
        elif group and line.startswith("| `") and line.count("|") >= 5:
            key = line.split("`")[1]
            keys.setdefault(group, set()).add(key)
            keys[group].add(key.split(".")[0])
    return keys


# ``+model.width=128`` adds a key on purpose (model=custom takes any): not checked
KEY = re.compile(r"(?<![\w.$/{+-])(%s)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?(?=[=`\s,)]|$)" % "|".join(GROUPS_CHECKED))


# README names these on purpose: a typo it shows refused, a key it says is gone, a Llama attribute
NOT_KEYS = {"trainer.max_stepz", "inference.compare", "model.layers"}
FILE_SUFFIXES = {"json", "jsonl", "yaml", "py", "md", "pt", "bin", "txt", "safetensors"}


def unknown_keys(text: str, where: str, keys: dict) -> List[str]:
    """Every ``group.key`` in ``text`` whose key no schema of that group declares."""
    unknown = []
    for m in KEY.finditer(text):
        group, key, sub = m.groups()
        if key in FILE_SUFFIXES or f"{group}.{key}" in NOT_KEYS:
            continue
        if key not in keys.get(group, ()) and f"{key}.{sub}" not in keys.get(group, ()):
            unknown.append(f"{where}: {m.group(0)}")
    return unknown


def test_config_keys_named_in_the_readme_are_keys():
    """``trainer.grad_accum_steps=4`` in the README (a command, a table, prose) is a key some schema of
    ``trainer`` declares."""
    keys = reference_keys()
    assert {"grad_accum_steps", "profile.enabled"} <= keys["trainer"] and "segments" in keys["ckpt"]
    text = (REPO / "README.md").read_text(encoding="utf-8")
    unknown = []
    for n, line in enumerate(text.splitlines(), 1):
        unknown += unknown_keys(line, f"README.md:{n}", keys)
    assert unknown_keys("trainer.grad_acum_steps=4", "planted", keys) == ["planted: trainer.grad_acum_steps"]
    assert not unknown, "README names config keys that no schema has:\n" + "\n".join(unknown)


def lazy_exports(path: Path) -> dict:
    """``{name: module}`` of a package's ``__getattr__ = lazy_attributes(__name__, {...})``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    dicts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
             for t in node.targets if isinstance(t, ast.Name)}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "id", None) == "lazy_attributes":
            table = node.value.args[1]
            table = dicts[table.id] if isinstance(table, ast.Name) else table
            return {k.value: v.value for k, v in zip(table.keys, table.values)}
    return {}


def test_every_lazily_exported_name_is_defined_where_its_package_says():
    """``ds_hydra.data.TokenFiles`` and the like import their module on first use: a module that moved
    would only fail then, in a user's code. Each one is checked here by reading the source."""
    packages = [p for p in (REPO / "ds_hydra").rglob("__init__.py") if lazy_exports(p)]
    assert len(packages) >= 4
    missing = []
    for init in packages:
        package = ".".join(init.parent.relative_to(REPO).parts)
        for name, module in lazy_exports(init).items():
            target = module if module.startswith("ds_hydra") else f"{package}.{module}"
            path = module_file(target)
            if path is None or name not in defined_names(path):
                missing.append(f"{package}.{name} -> {target}")
    assert not missing, "lazily exported names that are not where their package says:\n" + "\n".join(missing)


def test_the_check_sees_stale_names():
    """A planted stale name, path and class member are each found; live ones are not."""
    text = ("the checks of ``ds_hydra.training.fit.check_data_fits`` (training/fit.py), "
            "``ds_hydra.engine.base.Engine.setup_from_cfg``, see bench/no_such_bench.py")
    assert stale_names(text, "planted") == [
        "planted:1: ds_hydra.training.fit.check_data_fits",
        "planted:1: ds_hydra.engine.base.Engine.setup_from_cfg",
        "planted:1: training/fit.py",
        "planted:1: bench/no_such_bench.py",
    ]
    live = ("``ds_hydra.training.seq_vocab.check_data_fits`` (training/seq_vocab.py), ``ds_hydra.engine.base.Engine"
            ".setup``, ``ds_hydra.train``, ``${ds_hydra.fraction:0.05,${trainer.max_steps}}``, bench/ckpt.py, "
            "``ds_hydra.conf``, nanoGPT's data/shakespeare_char/prepare.py")
    assert stale_names(live, "live") == []
