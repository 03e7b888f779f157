"""README's test command installs only `.[dev]`: a test needing an optional extra must skip, with the
reason, before it needs it. This reads every test module and finds imports of an extra's packages that
nothing guards (``pytest.importorskip`` earlier in the module or the function, ``try/except ImportError``
around the import). What it cannot see, code of ds_hydra that a test calls and that imports an extra,
is what CI's first step catches: it runs the suite in a venv holding only what README's command installs.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

TESTS = REPO / "tests"
# The top-level packages each extra brings, by the names tests import them by (an extra not listed
# here is taken to bring a package of its own name).
EXTRA_PACKAGES = {
    "deepspeed": {"deepspeed", "hjson"},
    "sweeps": {"optuna", "submitit", "joblib", "hydra_plugins.hydra_joblib_launcher",
               "hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_submitit_launcher"},
    "tensorboard": {"tensorboard"},
    "wandb": {"wandb"},
    "mlflow": {"mlflow"},
    "tokenizers": {"tokenizers"},
    "parquet": {"pyarrow"},
    "hf": {"transformers", "safetensors"},
    "eval": {"lm_eval", "transformers", "safetensors"},
    "peft": {"peft", "safetensors"},
    "lora": {"peft", "safetensors"},
    "quant": {"bitsandbytes", "peft", "safetensors", "torchao"},
    "torchao": {"torchao"},
}

# What a guarded package brings with it (its own requirements): importorskip("transformers") guards
# safetensors and tokenizers too.
BRINGS = {
    "transformers": {"safetensors", "tokenizers"},
    "peft": {"transformers", "safetensors", "tokenizers"},
    "lm_eval": {"transformers", "safetensors", "tokenizers"},
    "deepspeed": {"hjson"},
}


def optional_packages() -> set:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = [e for e in re.findall(r"^([A-Za-z0-9_.-]+)\s*=", section, flags=re.M) if e != "dev"]
    return set().union(*(EXTRA_PACKAGES.get(e, {e.replace("-", "_")}) for e in extras))


def _optional(name: str, packages: set) -> str:
    """The optional package ``name`` (a dotted module) belongs to, or ''."""
    return next((p for p in sorted(packages, key=len, reverse=True) if name == p or name.startswith(p + ".")), "")


def _skipped_for(node: ast.AST) -> set:
    """Packages a ``pytest.importorskip("x")`` call in ``node`` guards (with what they bring)."""
    found = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", "")) == "importorskip":
            if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
                name = call.args[0].value
                found |= {name, *BRINGS.get(name.split(".")[0], ())}
    return found


def _guards_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(getattr(k, "id", "") in names for k in kinds):
            return True
    return False


def _is_fixture(function: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(d) for d in function.decorator_list)


def unguarded_imports(source: str, packages: set) -> list:
    """(line, package) of each import of an optional package, at module level, in a test or in a fixture,
    that no importorskip before it (in its module or its function) and no try/except ImportError around
    it guards. Helpers are left to their callers."""
    tree = ast.parse(source)
    found = []

    def visit(statements, guarded: set):
        guarded = set(guarded)
        for stmt in statements:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
                for name in names:
                    package = _optional(name, packages)
                    if package and not any(package == g or package.startswith(g + ".") or g.startswith(package) for g in guarded):
                        found.append((stmt.lineno, package))
            elif isinstance(stmt, ast.Try) and _guards_import_error(stmt):
                continue  # an ImportError here is handled (a fallback, or a skip)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not (stmt.name.startswith("test") or _is_fixture(stmt)):
                    continue  # a helper: its callers' guards count, which the fresh-venv run checks
                marks = set().union(*(_skipped_for(d) for d in stmt.decorator_list)) if stmt.decorator_list else set()
                visit(stmt.body, guarded | marks)
            elif isinstance(stmt, ast.ClassDef):
                visit(stmt.body, guarded)
            else:
                guarded |= _skipped_for(stmt)
                for field in ("body", "orelse", "finalbody"):
                    inner = getattr(stmt, field, None)
                    if isinstance(inner, list):
                        visit(inner, guarded)
            if isinstance(stmt, (ast.Expr, ast.Assign, ast.AnnAssign)):
                guarded |= _skipped_for(stmt)

    visit(tree.body, set())
    return found


def test_every_test_module_guards_its_optional_imports():
    packages = optional_packages()
    assert {"deepspeed", "tokenizers", "transformers", "pyarrow", "wandb", "mlflow", "tensorboard", "lm_eval", "peft"} <= packages
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, package in unguarded_imports(path.read_text(encoding="utf-8"), packages):
            problems.append(f"{path.relative_to(REPO)}:{line}: imports {package} with no pytest.importorskip({package!r}) before it")
    assert not problems, "\n".join(problems)


def test_the_checker_finds_an_unguarded_import():
    packages = {"tokenizers", "transformers"}
    assert unguarded_imports("import tokenizers\n", packages) == [(1, "tokenizers")]
    assert unguarded_imports("def test_x():\n    from transformers import AutoConfig\n", packages) == [(2, "transformers")]
    assert unguarded_imports("def test_x():\n    train()\n    pytest.importorskip('tokenizers')\n    import tokenizers\n"
                             "def test_y():\n    import tokenizers\n", packages) == [(6, "tokenizers")]
    guarded = ("import pytest\npytest.importorskip('tokenizers')\nimport tokenizers\n"
               "try:\n    import transformers\nexcept ImportError:\n    transformers = None\n"
               "def test_z():\n    tokenizers.Tokenizer\n")
    assert unguarded_imports(guarded, packages) == []
    fixture = "@pytest.fixture\ndef model_dir():\n    import transformers\ndef helper():\n    import transformers\n"
    assert unguarded_imports(fixture, packages) == [(3, "transformers")]
