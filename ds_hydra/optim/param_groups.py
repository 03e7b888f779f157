"""Split a model's parameters into the optimizer's param groups: weight decay on or off, lr multipliers."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch.nn as nn

from ds_hydra.errors import UserError

EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def embedding_parameter_ids(model: nn.Module) -> Set[int]:
    """ids of the parameters owned by an embedding module (a tied output head shares the table)."""
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, EMBEDDING_TYPES)
        for p in module.parameters(recurse=False)
    }


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: Optional[float] = None,
    decay_embeddings: bool = True,
    no_decay: Sequence[str] = (),
    lr_rules: Sequence[Tuple[str, float]] = (),
) -> List[Dict]:
    """The param-group dicts to call the optimizer with.

    A parameter decays when it has 2 or more dims (linear weights; embedding tables only when
    ``decay_embeddings``) and its name matches none of the ``no_decay`` regexes; biases and norm gains
    (dim < 2) never decay. ``lr_rules`` are ``(regex, lr_mult)`` pairs: the first whose regex is found
    in a parameter's name puts it in that rule's groups, with lr ``lr * lr_mult``.

    Groups come in a fixed order, empty ones dropped: ``decay``, ``no_decay``, then ``decay/lr_rules[i]``
    and ``no_decay/lr_rules[i]`` for each rule. Each records ``name`` (and ``lr_mult`` when a rule set
    it) for logs; optimizers keep the extra keys and ignore them. Tied weights appear once
    (``named_parameters`` de-duplicates them). A regex that matches no parameter is an error: a typo
    would otherwise silently change nothing.
    """
    no_decay_res = [re.compile(p) for p in no_decay]
    rule_res = [(re.compile(p), float(mult)) for p, mult in lr_rules]
    embeddings = embedding_parameter_ids(model)
    used_no_decay, used_rules = [False] * len(no_decay_res), [False] * len(rule_res)

    buckets: Dict[Tuple[Optional[int], bool], List] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        for i, regex in enumerate(no_decay_res):
            if regex.search(name):
                used_no_decay[i] = True
                decays = False
        rule = next((i for i, (regex, _) in enumerate(rule_res) if regex.search(name)), None)
        if rule is not None:
            used_rules[rule] = True
        buckets.setdefault((rule, decays), []).append(p)

    _check_all_used(model, "param_groups.no_decay", no_decay, used_no_decay)
    _check_all_used(model, "param_groups.lr_rules", [p for p, _ in lr_rules], used_rules, suffix=".pattern")

    groups = []
    for rule in [None, *range(len(rule_res))]:
        for decays in (True, False):
            params = buckets.get((rule, decays))
            if not params:
                continue
            name = "decay" if decays else "no_decay"
            group = {"name": name, "params": params, "weight_decay": weight_decay if decays else 0.0}
            if rule is not None:
                mult = rule_res[rule][1]
                group.update(name=f"{name}/lr_rules[{rule}]", lr_mult=mult)
                if lr is not None:
                    group["lr"] = lr * mult
            groups.append(group)
    return groups


def _check_all_used(model: nn.Module, key: str, patterns: Sequence[str], used: List[bool], suffix: str = "") -> None:
    for i, (pattern, hit) in enumerate(zip(patterns, used)):
        if not hit:
            names = [n for n, _ in model.named_parameters()]
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UserError(f"{key}[{i}]{suffix}={pattern!r}: matches no parameter of the model (names: {shown})")
