"""One source of truth for every default: the schemas. Option YAMLs pick and override only, every key of
theirs is commented, and docs/config_reference.md (every key, its default and its doc) is generated
from the schemas, so none of it can drift."""
from __future__ import annotations

import re

import pytest

from conftest import REPO
from ds_hydra import config_reference as ref
from ds_hydra.config_store import OPEN_SCHEMAS

OPTION_GROUPS = sorted(
    p.name for p in (REPO / "conf").iterdir()
    if p.is_dir() and not p.name.startswith("_") and p.name not in ("hydra", *ref.PRESET_GROUPS)
)
MAX_REPEATED_SHARE = 0.10  # a repeated default is kept only where it says something (gpt_tiny's 4 blocks)


def repeated_defaults():
    """``(option file, key, value, repeats its schema's default)`` for every value an option YAML sets."""
    for group in OPTION_GROUPS:
        for option, schema, values in ref.options(group):
            defaults = ref.schema_defaults(schema) if schema is not None else {}
            for key, value in values.items():
                default = defaults.get(key, KeyError)
                same = default is not KeyError and value == default and isinstance(value, bool) == isinstance(default, bool)
                yield f"{group}/{option}.yaml", key, value, same


def test_option_yamls_override_their_schemas_instead_of_repeating_them():
    rows = list(repeated_defaults())
    repeated = [f"{path}: {key}={value}" for path, key, value, same in rows if same]
    share = len(repeated) / len(rows)
    assert share <= MAX_REPEATED_SHARE, (
        f"{len(repeated)} of {len(rows)} values in conf/'s option YAMLs repeat their schema's default ({share:.0%}); "
        f"drop them (the schema is the one source of truth): {repeated}"
    )


def test_the_count_sees_a_repeated_default():
    """The check above can fail: the trainer's default max_steps and an optimizer's base lr are defaults."""
    from ds_hydra.training.config import TrainerConfig
    from ds_hydra.optim.config import OptimizerConfig

    assert ref.schema_defaults(TrainerConfig)["max_steps"] == TrainerConfig.max_steps
    assert ref.schema_defaults(OptimizerConfig)["lr"] == 1e-3 and OptimizerConfig in OPEN_SCHEMAS
    rows = {(path, key): same for path, key, _, same in repeated_defaults()}
    assert rows[("model/gpt_tiny.yaml", "n_layer")] is True  # 4, the GPT schema's default, kept for its comment
    assert rows[("model/gpt_tiny.yaml", "n_embd")] is False
    assert rows[("optimizer/sgd.yaml", "momentum")] is False  # not in the open optimizer schema: torch's argument


KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w./]*:(\s|$)")


@pytest.mark.parametrize("group", OPTION_GROUPS)
def test_every_option_yaml_key_has_a_comment(group):
    bare = [
        f"{path.name}:{n}: {line.strip()}"
        for path in ref.option_files(group)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if KEY_LINE.match(line) and not line.startswith("defaults:") and "#" not in line
    ]
    assert not bare, bare


def test_reference_is_generated_from_the_schemas_and_current():
    text = ref.render()
    written = (REPO / ref.REFERENCE).read_text()
    assert written == text, "docs/config_reference.md is stale: run python -m ds_hydra.config_reference --write"


def test_reference_lists_every_key_with_its_default_and_a_doc():
    from ds_hydra.config_store import SCHEMAS, DSHydraConfig
    from ds_hydra.training.config import TrainerConfig

    text = ref.render()
    rows = [row for _, _, schema in SCHEMAS for row in ref.schema_rows(schema)] + list(ref.schema_rows(DSHydraConfig))
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented, f"schema fields without a docstring under them: {undocumented}"
    for group in OPTION_GROUPS:
        assert f"\n## {group}\n" in text
    # a row as a reader sees it: key, type, default, the field's docstring
    assert ("| `max_steps` | int | `2000` | Optimizer steps to train for. |") in text and TrainerConfig.max_steps == 2000
    assert "| `precision` | auto \\| fp32 \\| bf16 \\| fp16 | `auto` |" in text
    assert "| `warmup_steps` | int | `${ds_hydra.fraction:0.05,${trainer.max_steps}}` |" in text
    assert "| `sgd` | OptimizerConfig | `_target_=torch.optim.SGD`, `lr=0.1`, `momentum=0.9` |" in text
