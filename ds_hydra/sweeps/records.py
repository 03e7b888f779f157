"""The record each sweep job leaves in its directory (``sweep_job.json``), and finding them again.

The callback writes them (in whichever process ran the job), the report reads them: both import
this module, so neither imports the other.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

JOB_RECORD_FILE = "sweep_job.json"


def write_job_record(job_dir: Path, record: Dict[str, Any]) -> None:
    """``<job dir>/sweep_job.json``, replaced atomically (the report may be reading the sweep dir)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / (JOB_RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(job_dir / JOB_RECORD_FILE)


def collect_job_records(sweep_dir: Path, sweep_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """The job records under ``sweep_dir`` (of sweep ``sweep_id`` only, when given), by job number."""
    records = []
    for path in Path(sweep_dir).rglob(JOB_RECORD_FILE):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable job record %s: %s", path, exc)
            continue
        if sweep_id is None or record.get("sweep_id") in (None, sweep_id):
            records.append(record)
    return sorted(records, key=lambda r: r.get("num", 0))


