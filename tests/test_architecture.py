"""The shape of the code: layers that only point down, no import cycles (imports inside functions count
too, ``hydra_plugins/`` included), configuration stays torch-free, and components take their own slice
of the config, never the whole of it."""
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


# -- module-level mutable state ----------------------------------------------------------------------
# A module-level value is state when the module changes it after import: a dict, list or set (literal,
# comprehension or call) that its own code assigns into or calls a mutating method on, any name a
# `global` statement rebinds, and any instance of a class of the module made at import (its methods
# change it out of this scan's sight). Constant tables (TASKS, key maps, __all__) are never changed,
# so they are not state. State carries things between Hydra's callbacks, the task and the next run in
# the process; the command's StartUp (ds_hydra.common.startup) is the channel for that instead.
MUTABLE_CALLS = {"dict", "list", "set", "OrderedDict", "defaultdict", "deque", "Counter", "bytearray",
                 "WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}
MUTATORS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "clear", "remove",
            "discard", "move_to_end", "appendleft", "popleft", "__setitem__"}

# module -> name: the module-level state that may stay, each with why it is inherent and who owns it.
ALLOWED_STATE = {
    # a signal handler is process-global, so the stop request it records is; lives for the outermost
    # stop_on_signals block (cleared when it opens and ends): a second run in the process starts clear
    "ds_hydra.common.signals": {"_state"},
    # a memo keyed by everything the data is built from, of read-only values, bounded (DataMemo)
    "ds_hydra.data.memo": {"DATA_MEMO"},
    # the one checkpointed subclass per block class: its identity must stay fixed for isinstance and pickle
    "ds_hydra.activation_checkpointing.apply": {"_SUBCLASSES", "_WARNED_CACHE"},
    # the open counters, innermost last: torch.compile reads a plain module list without a graph break
    "ds_hydra.activation_checkpointing.counter": {"_ACTIVE"},
    # DeepSpeed's checkpointing module is configured through module functions (configure()); its drop-in
    # keeps that API, so its settings live in the module
    "ds_hydra.deepspeed.checkpointing": {"_STATE"},
    # Megatron's and DeepSpeed's get_cuda_rng_tracker() API: one model-parallel RNG tracker per process
    "ds_hydra.activation_checkpointing.rng": {"_TRACKER"},
    # a multiprocessing pool worker's initializer settings: one worker process, one prepare
    "ds_hydra.data.prepare": {"_worker"},
}


def _root_name(node) -> Optional[str]:
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def module_state(source: str) -> Dict[str, str]:
    """Module-level state of one module's source: name -> how it is changed (see above)."""
    tree = ast.parse(source)
    own_classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    containers: Dict[str, int] = {}
    found: Dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        value = node.value
        call = value.func if isinstance(value, ast.Call) else None
        called = call.id if isinstance(call, ast.Name) else call.attr if isinstance(call, ast.Attribute) else None
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            if not isinstance(target, ast.Name):
                continue
            if called in own_classes:
                found[target.id] = f"an instance of {called} made at import (line {node.lineno})"
            elif isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or called in MUTABLE_CALLS:
                containers[target.id] = node.lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            for name in node.names:
                found.setdefault(name, f"rebound by `global {name}` (line {node.lineno})")
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, (ast.Subscript, ast.Attribute)) and _root_name(target) in containers:
                found.setdefault(_root_name(target), f"`{ast.unparse(target)}` assigned (line {node.lineno})")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            name = _root_name(node.func.value)
            if name in containers:
                found.setdefault(name, f"`{ast.unparse(node.func)}(...)` (line {node.lineno})")
    return found


def test_no_module_level_mutable_state_outside_the_allow_list():
    found = []
    for name, path in sorted(all_modules().items()):
        for variable, how in sorted(module_state(path.read_text(encoding="utf-8")).items()):
            if variable not in ALLOWED_STATE.get(name, ()):
                found.append(f"{name}.{variable}: {how}")
    assert not found, ("module-level mutable state (hand it through the command's StartUp or an object its "
                       "caller owns; or, if a process-wide singleton is inherent, allow it above saying why):\n"
                       + "\n".join(found))
    stale = sorted(f"{m}.{v}" for m, names in ALLOWED_STATE.items() for v in names
                   if m not in all_modules() or v not in module_state(all_modules()[m].read_text(encoding="utf-8")))
    assert not stale, f"allowed but gone (remove from ALLOWED_STATE): {stale}"


def test_the_state_check_sees_planted_globals():
    planted = '''
TABLE = {"a": 1}            # a constant table: read only
_seen = set()
_memo = {}
_stack = []
_flag = None


class _Holder:
    pass


_holder = _Holder()


def note(key, value):
    global _flag
    _flag = key
    _seen.add(key)
    _memo[key] = value
    _stack.append(TABLE["a"])
'''
    assert set(module_state(planted)) == {"_flag", "_seen", "_memo", "_stack", "_holder"}


# -- each component gets its own slice of the config ------------------------------------------------
# The packages and modules whose functions are handed slices of the run's config (the ``engine`` config,
# the ``data`` config, ...); ds_hydra.training.slices and the task functions (ds_hydra.cli.tasks) cut them.
SLICE_TAKERS = ("engine", "data", "optim", "models", "loss", "activation_checkpointing", "tracking", "training/metrics.py",
                "inference/export_hf.py")
CONFIG_PARAMETER = re.compile(r"^(cfg|conf|config|root|\w+_cfg|\w+_config)$")


def top_level_keys() -> Set[str]:
    """The run config's top-level keys that name nothing inside a group (``name`` is also engine.name)."""
    from omegaconf import OmegaConf

    from conftest import compose

    config = OmegaConf.to_container(compose([]), resolve=False)
    config.pop("hydra", None)
    inner: Set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            inner.update(map(str, node))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for value in config.values():
        walk(value)
    return set(config) - inner


def whole_config_reads(source: str, groups: Set[str]) -> List[str]:
    """``function(parameter): keys`` for each function whose config parameter (``cfg``, ``config``,
    ``*_cfg``, ...) is read at a top-level key of the run config (``cfg.trainer``, ``cfg["data"]``,
    ``cfg.get("model")``, ``getattr(cfg, "ckpt")``): it was handed the whole config."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = fn.args
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if CONFIG_PARAMETER.match(a.arg)}
        reads: Dict[str, Set[str]] = {}
        for node in ast.walk(fn):
            owner, key = None, None
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                owner, key = node.value.id, node.attr
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and isinstance(node.slice, ast.Constant):
                owner, key = node.value.id, node.slice.value
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[-1], ast.Constant):
                func, first = node.func, node.args[0]
                if isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name):
                    owner, key = func.value.id, first.value if isinstance(first, ast.Constant) else None
                elif isinstance(func, ast.Name) and func.id == "getattr" and isinstance(first, ast.Name) and len(node.args) >= 2:
                    owner, key = first.id, node.args[1].value if isinstance(node.args[1], ast.Constant) else None
            if owner in params and key in groups:
                reads.setdefault(owner, set()).add(key)
        found += [f"{fn.name}({param}): {', '.join(sorted(keys))}" for param, keys in sorted(reads.items())]
    return found


def test_components_take_their_slice_of_the_config():
    groups = top_level_keys()
    assert {"trainer", "engine", "data", "optimizer", "scheduler", "model", "tokenizer", "logger"} <= groups
    found = []
    for place in SLICE_TAKERS:
        path = REPO / "ds_hydra" / place
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            found += [f"{file.relative_to(REPO)}: {read}" for read in whole_config_reads(file.read_text(encoding="utf-8"), groups)]
    assert not found, "handed the whole config (give them their slice; the caller cuts it):\n" + "\n".join(found)


def test_the_slice_check_sees_a_whole_config():
    """Shapes that builders had when they took the whole config are found; slices and torch objects are not."""
    groups = top_level_keys()
    whole = """
def setup(self, model, cfg, blocks):
    in_backward = bool(cfg.trainer.get("optimizer_in_backward", False))
    return build_optimizer(cfg.optimizer, model, param_groups=cfg.get("param_groups")), build_scheduler(cfg["scheduler"])

def build_data(config):
    return instantiate(getattr(config, "data"))
"""
    assert whole_config_reads(whole, groups) == ["setup(cfg): optimizer, param_groups, scheduler, trainer", "build_data(config): data"]
    sliced = """
def wrap(self, model, engine_cfg, optimizer):
    groups = optimizer.param_groups  # a torch optimizer's
    return DDP(model, bucket_cap_mb=engine_cfg.bucket_cap_mb), engine_cfg.name, engine_cfg.get("extra")
"""
    assert whole_config_reads(sliced, groups) == []
