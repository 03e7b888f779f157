"""The shape of the code: layers that only point down, no import cycles (imports inside functions count
too, ``hydra_plugins/`` included), and configuration stays torch-free."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
import re
from typing import Dict, List, Optional, Set, Tuple

from conftest import REPO

PACKAGES = (REPO / "ds_hydra", REPO / "hydra_plugins")

# The layers, lowest first. A module may import modules of its own unit and of units on lower rows,
# never of a unit on its own row or above. A unit is a package or a top-level module; the schema
# modules (SCHEMA) belong to the "config" row whatever package holds them: they are torch-free
# dataclasses that config_store registers and validation checks before anything is built.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("errors", ("ds_hydra.errors", "ds_hydra.lazy")),
    ("common", ("ds_hydra", "ds_hydra.common")),  # torch-free helpers; the package's lazy names
    ("schemas", ("schemas", "ds_hydra.instantiate")),
    ("help", ("ds_hydra.help",)),
    ("config", ("ds_hydra.config_store", "ds_hydra.validation")),
    ("config reference", ("ds_hydra.config_reference",)),
    ("devices", ("ds_hydra.devices", "ds_hydra.plotting")),
    ("components", ("ds_hydra.models", "ds_hydra.optim", "ds_hydra.tracking")),
    ("around the model", ("ds_hydra.data", "ds_hydra.activation_checkpointing", "ds_hydra.loss")),
    ("deepspeed", ("ds_hydra.deepspeed",)),
    ("engine", ("ds_hydra.engine",)),
    ("training", ("ds_hydra.training",)),
    ("tasks", ("ds_hydra.inference", "ds_hydra.sweeps", "ds_hydra.validate_task")),
    ("harness", ("ds_hydra.harness",)),  # lm-evaluation-harness, through inference's loading and generation
    ("train task", ("ds_hydra.train_task",)),  # the loop, then the harness after training
    ("cli", ("ds_hydra.cli",)),
    ("entry points", ("ds_hydra.__main__", "ds_hydra.checkpointing")),  # python -m ds_hydra; the old module name
    ("plugins", ("hydra_plugins",)),
)
SCHEMA = re.compile(r"^ds_hydra\.[a-z_]+\.([a-z_]+_)?config$")


def unit_of(module: str) -> Optional[str]:
    """The unit of the layer table that ``module`` belongs to (None: not in the table)."""
    if SCHEMA.match(module):
        return "schemas"
    units = [u for _, row in LAYERS for u in row if u != "schemas"]
    if module == "ds_hydra":
        return "ds_hydra"
    found = [u for u in units if u != "ds_hydra" and (module == u or module.startswith(u + "."))]
    return max(found, key=len) if found else None


def layer_of(unit: str) -> int:
    return next(i for i, (_, row) in enumerate(LAYERS) if unit in row)


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """Every import of a module on the same row or a higher one, as ``importer -> imported``."""
    found = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            a, b = unit_of(importer), unit_of(target)
            if a != b and layer_of(b) >= layer_of(a):
                found.append(f"{importer} ({LAYERS[layer_of(a)][0]}) -> {target} ({LAYERS[layer_of(b)][0]})")
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> Dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in package.rglob("*.py")}


def imports_of(path: Path, name: str, modules: Set[str]) -> Set[str]:
    """ds_hydra modules that ``path`` imports anywhere in its body (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import ds_hydra.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = all_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "ds_hydra.training.trainer" in graph["ds_hydra.cli"] or any(
        "ds_hydra.training" in m for m in graph["ds_hydra.cli"])
    assert "ds_hydra.inference.evaluate" in graph["ds_hydra.inference"]  # imported inside run_inference
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    missing = sorted(m for m in all_modules() if unit_of(m) is None)
    assert not missing, f"modules in no row of LAYERS (add their package): {missing}"


def test_layers_only_point_down():
    found = upward_imports(import_graph())
    assert not found, "imports of a unit on the same layer or above:\n" + "\n".join(found)


def test_the_layer_check_sees_an_upward_import():
    graph = {"ds_hydra.common.files": {"ds_hydra.training.trainer"}, "ds_hydra.training.trainer": {"ds_hydra.common.files"},
             "ds_hydra.engine.config": {"ds_hydra.errors"}, "ds_hydra.config_store": {"ds_hydra.engine.config"},
             "ds_hydra.models.build": {"ds_hydra.optim.build"}, "hydra_plugins.x._core": {"ds_hydra.cli"}}
    assert upward_imports(graph) == [
        "ds_hydra.common.files (common) -> ds_hydra.training.trainer (training)",
        "ds_hydra.models.build (components) -> ds_hydra.optim.build (components)",
    ]
    assert unit_of("ds_hydra.data.tokenizer_config") == "schemas" and unit_of("ds_hydra.data.tokenizer") == "ds_hydra.data"


def test_the_graph_covers_the_plugins():
    graph = import_graph()
    assert "ds_hydra.cli.torchrun_job" in graph["hydra_plugins.ds_hydra_torchrun_launcher._core"]
    assert "hydra_plugins.ds_hydra_torchrun_launcher._core" in graph["hydra_plugins.ds_hydra_torchrun_launcher.torchrun_launcher"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_composing_a_config_imports_no_torch():
    code = (
        "import sys; from ds_hydra.config_store import register_configs; register_configs(); "
        "import ds_hydra.validation, ds_hydra.cli; print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
