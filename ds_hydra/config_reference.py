"""Every config key with its type, default and doc, generated from the schemas (torch-free).

    python -m ds_hydra.config_reference            # print the reference (markdown)
    python -m ds_hydra.config_reference --write    # rewrite docs/config_reference.md

The schemas (ds_hydra.config_store) hold every default; a field's doc is the docstring under it. The
option YAMLs in conf/ only pick a schema and override what differs, so each option is listed with the
values it sets. A test regenerates the file and compares, so it cannot go stale.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

REFERENCE = Path("docs") / "config_reference.md"
PRESET_GROUPS = ("experiment", "hparams_search")  # `# @package _global_` presets: they set other groups' keys
HYDRA_DOCS = {"_target_": "The callable this node builds.", "_partial_": "Built as a callable that takes the rest at run time."}


def conf_dir() -> Path:
    """The installed ``ds_hydra.conf`` package, else the checkout's ``conf/``."""
    from importlib.util import find_spec

    spec = find_spec("ds_hydra.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "conf"


# -- schemas ----------------------------------------------------------------------------------------
def field_docs(schema: type) -> Dict[str, str]:
    """The docstring under each field of ``schema`` and of the dataclasses it extends, on one line."""
    docs: Dict[str, str] = {}
    for klass in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for item, after in zip(body, body[1:]):
            if isinstance(item, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[item.target.id] = " ".join(str(after.value.value).split())
    return docs


def schema_rows(schema: type, prefix: str = "") -> Iterator[Tuple[str, str, Any, str]]:
    """``(dotted key, type, raw default, doc)`` for every leaf field; nested schemas are flattened."""
    hints = typing.get_type_hints(schema)
    defaults = OmegaConf.structured(schema)
    docs = field_docs(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from schema_rows(kind, f"{prefix}{f.name}.")
            continue
        doc = docs.get(f.name, HYDRA_DOCS.get(f.name, ""))
        yield f"{prefix}{f.name}", type_name(kind), raw_value(defaults._get_node(f.name)), doc
        item = (typing.get_args(kind) or [None])[0]
        if typing.get_origin(kind) in (list, List) and dataclasses.is_dataclass(item):  # each item's fields
            yield from schema_rows(item, f"{prefix}{f.name}[].")


def schema_defaults(schema: type) -> Dict[str, Any]:
    """``{dotted key: raw default}`` (interpolations as written, enums by name, ??? when required)."""
    return {key: default for key, _, default, _ in schema_rows(schema) if "[]" not in key}


def type_name(kind: Any) -> str:
    """``int``, ``float or null``, ``list of str``, ``auto | fp32 | bf16``: the type as a reader wants it."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        return f"{type_name(args[0])} or null" if len(args) == 1 else " or ".join(type_name(a) for a in args)
    if origin in (list, List):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "dict"
    if isinstance(kind, type) and issubclass(kind, Enum):
        return " \\| ".join(dict.fromkeys(m.name for m in kind))
    return "any" if kind is Any else getattr(kind, "__name__", str(kind))


def raw_value(node) -> Any:
    """A node's value as written: ``${...}`` for interpolations, ``???`` when required, enums by name."""
    if isinstance(node, (DictConfig, ListConfig)):
        return "???" if node._is_missing() else OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    value = node._value()
    return value.name if isinstance(value, Enum) else value


def inline(value: Any) -> str:
    """``value`` as it would be written in YAML on one line (lists and dicts in flow style)."""
    if isinstance(value, list):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {inline(v)}" for k, v in value.items()) + "}"
    return OmegaConf.to_yaml({"v": value}).strip()[len("v: "):]


# -- options ----------------------------------------------------------------------------------------
def option_files(group: str) -> List[Path]:
    return sorted((conf_dir() / group).glob("*.yaml"))


def option_schema(group: str, raw: DictConfig) -> Optional[type]:
    """The schema an option extends (its ``/schema/<group>/<name>`` line, else the root schema's field)."""
    from ds_hydra.config_store import SCHEMAS, DSHydraConfig

    for entry in raw.get("defaults", None) or []:
        if isinstance(entry, str) and entry.startswith("/schema/"):
            schema_group, name = entry[len("/schema/"):].split("@")[0].split("/")
            return next(s for g, n, s in SCHEMAS if (g, n) == (schema_group, name))
    kind = typing.get_type_hints(DSHydraConfig).get(group)
    return kind if dataclasses.is_dataclass(kind) else None


def option_values(raw: DictConfig) -> Dict[str, Any]:
    """``{dotted key: raw value}`` of what an option YAML sets (its leaves; an empty dict is a leaf)."""
    values: Dict[str, Any] = {}

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            if not prefix and key == "defaults":
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and len(child) and not child._is_missing():
                walk(child, f"{prefix}{key}.")
            else:
                values[f"{prefix}{key}"] = raw_value(child)

    walk(raw, "")
    return values


def options(group: str) -> Iterator[Tuple[str, Optional[type], Dict[str, Any]]]:
    """``(option, schema, values it sets)`` for every option YAML of ``group``."""
    for path in option_files(group):
        raw = OmegaConf.load(path)
        yield path.stem, option_schema(group, raw), option_values(raw)


# -- the document -----------------------------------------------------------------------------------
def render() -> str:
    from ds_hydra.config_store import SCHEMAS, DSHydraConfig

    hints = typing.get_type_hints(DSHydraConfig)
    top = [(name, kind) for name, kind in hints.items() if not _is_group(name, kind, SCHEMAS)]
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m ds_hydra.config_reference --write` from the schemas; do not edit. Each key's",
        "default is its schema's; an option (a YAML in `conf/<group>/`) sets only what its table lists.",
        "`python -m ds_hydra --cfg job` prints a composed config (`--package trainer`: one group).",
        "",
        "## Top level",
        "",
        *_table((key, kind, default, doc) for key, kind, default, doc in schema_rows(DSHydraConfig) if key in dict(top)),
    ]
    for group, kind in hints.items():
        if (group, kind) in top:
            continue
        out += ["", f"## {group}", ""]
        schemas = [kind] if dataclasses.is_dataclass(kind) else [s for g, _, s in SCHEMAS if g == group]
        out += _options_table(group)
        for schema in schemas:
            out += ["", f"### {schema.__name__}", ""] + _schema_doc(schema)
            out += list(_table(schema_rows(schema)))
    for group in PRESET_GROUPS:
        out += ["", f"## {group}", "", "Presets (`# @package _global_`): each sets keys of several groups.", ""]
        out += _options_table(group)
    return "\n".join(out) + "\n"


def _is_group(name: str, kind: Any, schemas) -> bool:
    return dataclasses.is_dataclass(kind) or any(g == name for g, _, _ in schemas)


def _schema_doc(schema: type) -> List[str]:
    """The class docstring as a paragraph (a dataclass without one has its signature as ``__doc__``)."""
    doc = schema.__doc__ or ""
    return [] if doc.startswith(f"{schema.__name__}(") else [" ".join(doc.split()), ""]


def _table(rows) -> Iterator[str]:
    yield "| key | type | default | doc |"
    yield "|---|---|---|---|"
    for key, kind, default, doc in rows:
        yield f"| `{key}` | {kind} | `{_cell(inline(default))}` | {_cell(doc)} |"


def _options_table(group: str) -> List[str]:
    if not option_files(group):
        return ["No options: set its keys directly (`" + group + ".<key>=...`)."]
    rows = ["| option | schema | sets |", "|---|---|---|"]
    for option, schema, values in options(group):
        sets = ", ".join(f"`{k}={_cell(inline(v))}`" for k, v in values.items()) or "nothing: the schema's defaults"
        rows.append(f"| `{option}` | {schema.__name__ if schema else '-'} | {sets} |")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: List[str]) -> None:
    text = render()
    if "--write" in argv:
        path = Path(__file__).resolve().parent.parent / REFERENCE
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
