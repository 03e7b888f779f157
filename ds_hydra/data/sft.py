"""``data=sft``: supervised fine-tuning examples from JSONL; the loss covers the responses only.

Each line is one example, either

* ``{"prompt": "...", "response": "..."}``: the prompt is context, the response (then the
  end-of-text token) is trained on; or
* ``{"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}``: every message
  opens with ``role_template`` (context); messages of ``train_roles`` are trained on and end with the
  end-of-text token, the others end with ``message_end`` (context).

Each part is tokenized on its own, so the boundary between context and trained tokens is exact.
``labels[t]`` is the token after position ``t`` when that token is trained on, else -100 (no loss,
no gradient). Rows of ``seq_len`` hold one example each, padded (labels -100), or with ``pack``
as many whole examples as fit; examples longer than a row are cut, and counted in the log.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ds_hydra.data.base import IGNORE_INDEX, TokenData, check_split
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

Part = Tuple[str, bool]  # (text, trained on)
EOS = None  # a part standing for the end-of-text token


class SFTData(TokenData):
    """Prompt/response or chat examples as rows of ``{"input_ids", "labels"}`` with the prompt masked."""

    eval_whole_split = True  # in-run validation: every val example once (not eval_batches random rows)

    def __init__(self, path: Optional[str] = None, val_path: Optional[str] = None, train_fraction: float = 0.9, seq_len: Optional[int] = None,
                 pack: bool = False, train_roles: Sequence[str] = ("assistant",), role_template: str = "<|{role}|>\n",
                 message_end: str = "\n", tokenizer_cfg=None, model_pretrained: Optional[str] = None):
        super().__init__(seq_len)
        self.pack = pack
        render = lambda record, where: render_example(record, where, list(train_roles), role_template, message_end)  # noqa: E731
        train = [render(r, w) for r, w in read_jsonl(path, "data.path")]
        if val_path is not None:
            val = [render(r, w) for r, w in read_jsonl(val_path, "data.val_path")]
        else:
            cut = int(len(train) * train_fraction)
            train, val = train[:cut], train[cut:]
        if not train or not val:
            raise UserError(
                f"data.train_fraction={train_fraction}: leaves {len(train)} train and {len(val)} val examples of {path}; "
                "each needs at least 1 (more examples, or data.val_path)"
            )
        self.tokenizer = _sft_tokenizer(tokenizer_cfg, train + val, model_pretrained)
        self.vocab_size = self.tokenizer.vocab_size
        if self.tokenizer.eos_id is None:
            log.warning("the %s has no end-of-text token: trained messages end without one, so the model does not learn "
                        "where to stop (set tokenizer.eos_token)", self.tokenizer)
        self.examples = {"train": [self._encode(e) for e in train], "val": [self._encode(e) for e in val]}
        self.source = f"{path or EXAMPLE_FILE} ({len(train)} train / {len(val)} val examples{', packed' if pack else ''})"
        self._rows: Dict[Tuple[str, int], Tuple[np.ndarray, np.ndarray]] = {}

    def _encode(self, parts: List[Part]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, trained) of one example: token ids and whether each token is trained on."""
        ids, trained = [], []
        for text, train in parts:
            if text is EOS:
                if self.tokenizer.eos_id is None:
                    continue
                piece = np.array([self.tokenizer.eos_id], dtype=np.int64)
            else:
                piece = self.tokenizer.encode_array(text)
            ids.append(piece)
            trained.append(np.full(len(piece), train))
        return np.concatenate(ids), np.concatenate(trained)

    def tokens(self, split: str) -> np.ndarray:
        """The split's examples' tokens, one after another (what the loss sees is ``rows``)."""
        return np.concatenate([ids for ids, _ in self.examples[check_split(split)]])

    def num_tokens(self, split: str) -> int:
        return sum(len(ids) for ids, _ in self.examples[check_split(split)])

    def rows(self, split: str, seq_len: int) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(input_ids, labels, position_ids)``, each ``(rows, seq_len)`` int64, of the split's examples
        (``position_ids``: packed rows only, else None); see ``build_rows``."""
        key = (check_split(split), seq_len)
        if key not in self._rows:
            self._rows[key] = build_rows(self.examples[split], seq_len, self.pack, pad_id=self.tokenizer.eos_id or 0, split=split)
        return self._rows[key]

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0, world_size: Optional[int] = None):
        from ds_hydra.data.samplers import RowSampler

        return RowSampler(*self.rows(split, seq_len), batch_size, seed, stream, rank, world_size)

    def whole_split(self, split: str, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """Every example of ``split`` once, in order (see ``WholeSplit``): how SFT data are evaluated."""
        from ds_hydra.data.samplers import WholeSplit

        return WholeSplit.of_rows(*self.rows(split, seq_len), batch_size, rank, world_size)

    def check(self, seq_len: int) -> None:
        """Before step 1: both splits' rows at ``seq_len``, logging cut and dropped examples, refusing a split
        left empty (one line each)."""
        for split in ("train", "val"):
            self.rows(split, seq_len)


EXAMPLE_FILE = "sft_example.jsonl"


def read_jsonl(path: Optional[str], key: str):
    """``(record, where)`` for each non-blank line of ``path`` (None: the example set shipped with
    ds_hydra); ``where`` names the file and byte offset."""
    if path is None:
        from importlib import resources

        file, data = EXAMPLE_FILE, resources.files("ds_hydra.data").joinpath(EXAMPLE_FILE).read_bytes()
    else:
        file = Path(str(path)).expanduser()
        if not file.is_file():
            raise UserError(f"{key}={path}: no such file (give a JSONL file of prompt/response or messages records)")
        data = file.read_bytes()
    from ds_hydra.data.prepare_inputs import jsonl_records

    records = [(record, f"{file}: byte {offset}") for record, offset in jsonl_records(data, str(file), fix="fix the file")]
    if not records:
        raise UserError(f"{key}={path}: holds no records")
    return records


def render_example(record, where: str, train_roles: List[str], role_template: str, message_end: str) -> List[Part]:
    """The parts of one record: (text, trained) pairs, the end-of-text token as ``(EOS, trained)``."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        parts: List[Part] = []
        for n, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise UserError(f"{where}: message {n} must have string 'role' and 'content' fields")
            trained = message["role"] in train_roles
            parts += [(role_template.format(role=message["role"]), False), (message["content"], trained)]
            parts.append((EOS, True) if trained else (message_end, False))
        if not any(trained for text, trained in parts if text is not EOS):
            raise UserError(f"{where}: no message of a trained role ({', '.join(train_roles)}); set data.train_roles")
        return parts
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise UserError(f"{where}: 'prompt' and 'response' must be strings, the response non-empty")
        return [(prompt, False), (response, True), (EOS, True)]
    fields = f" (fields: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
    raise UserError(f"{where}: a record needs 'prompt' and 'response', or 'messages'{fields}")


def _sft_tokenizer(cfg, examples: List[List[Part]], model_pretrained: Optional[str]):
    """The ``tokenizer`` group's tokenizer; char and bpe learn from the examples' text."""
    from ds_hydra.data.tokenizer import build_tokenizer

    if cfg is None:
        cfg = {"kind": "char", "eos_token": "<|endoftext|>"}
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    texts = lambda: (text for parts in examples for text, _ in parts if text is not EOS)  # noqa: E731
    return build_tokenizer(cfg, texts, model_pretrained=model_pretrained)


def build_rows(examples, seq_len: int, pack: bool, pad_id: int, split: str = "train") -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Each example as (inputs, labels) shifted by one, cut to ``seq_len``; then one per row (padded)
    or packed greedily in order (an example that does not fit in the row's rest starts the next row).

    Returns ``(input_ids, labels, position_ids)``, each ``(rows, seq_len)`` int64; ``position_ids`` only
    when packing (else None): positions restart at 0 at each example (and at the padding after the last
    one), which is how the model keeps a row's examples apart (``ds_hydra.models.packing``).
    """
    pairs, cut, empty = [], 0, 0
    for ids, trained in examples:
        inputs, labels = ids[:-1], np.where(trained[1:], ids[1:], IGNORE_INDEX)
        if len(inputs) > seq_len:
            inputs, labels, cut = inputs[:seq_len], labels[:seq_len], cut + 1
        if (labels == IGNORE_INDEX).all():
            empty += 1  # nothing to learn from within seq_len: a row of it would be all -100
            continue
        pairs.append((inputs, labels))
    if cut:
        log.warning("data.seq_len=%d: %d of %d %s examples are longer and were cut (their tail carries no loss)", seq_len, cut, len(examples), split)
    if empty:
        log.warning("data.seq_len=%d: %d of %d %s examples have no trained token within it and were dropped", seq_len, empty, len(examples), split)
    if not pairs:
        raise UserError(f"data.seq_len={seq_len}: no {split} example has a trained (response) token within it; raise data.seq_len "
                        f"(or model.block_size when data.seq_len is null)")
    rows: List[List[Tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a first row
    for inputs, labels in pairs:
        if not pack or used + len(inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, labels))
        used += len(inputs)
    all_inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    all_labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64) if pack else None
    for r, row in enumerate(rows):
        at = 0
        for inputs, labels in row:
            all_inputs[r, at:at + len(inputs)] = inputs
            all_labels[r, at:at + len(labels)] = labels
            if positions is not None:
                positions[r, at:at + len(inputs)] = np.arange(len(inputs))
            at += len(inputs)
        if positions is not None:
            positions[r, at:] = np.arange(seq_len - at)  # the padding: a document of its own, with no loss
    return all_inputs, all_labels, positions

