"""Read back what the trackers wrote, as their users' tools would: W&B's offline run files, MLflow's store."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List

_BLOCK = 32768  # W&B's run file is a LevelDB-style log: 32 KiB blocks of checksummed records
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, pending = 7, b""  # after the 7-byte header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_wandb_run(offline_dir: Path) -> Dict[str, Any]:
    """An offline run dir (``wandb/offline-run-*``): its id, name, group, config, history rows, summary."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(offline_dir).glob("run-*.wandb")
    run: Dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for raw in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group,
                       project=record.run.project, tags=list(record.run.tags))
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def wandb_runs(run_dir: Path) -> List[Dict[str, Any]]:
    """Every offline W&B run under ``<run dir>/wandb``, oldest first."""
    return [read_wandb_run(d) for d in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]


def metric_rows(records: List[Dict[str, Any]], keys=("loss", "lr", "tokens_per_s", "train_loss", "val_loss")) -> Dict[int, Dict[str, float]]:
    """``{step: {metric: value}}`` of metrics.jsonl records (or W&B history rows, keyed by ``_step``)."""
    rows: Dict[int, Dict[str, float]] = {}
    for record in records:
        step = record.get("step", record.get("_step"))
        rows.setdefault(step, {}).update({k: v for k, v in record.items() if k in keys})
    return rows


def mlflow_history(client, run_id: str, keys=("loss", "lr", "tokens_per_s", "train_loss", "val_loss")) -> Dict[int, Dict[str, float]]:
    """``{step: {metric: value}}`` of one MLflow run (each step must hold one value per metric)."""
    rows: Dict[int, Dict[str, float]] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            assert key not in rows.get(metric.step, {}), f"{key} logged twice at step {metric.step}"
            rows.setdefault(metric.step, {})[key] = metric.value
    return rows
