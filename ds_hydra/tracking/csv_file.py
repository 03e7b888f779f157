"""``logger=[jsonl,csv]``: ``<run dir>/metrics.csv``, the records of ``metrics.jsonl`` as spreadsheet rows."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ds_hydra.tracking.base import RunInfo, Tracker

CSV_FILE = "metrics.csv"


class CsvTracker(Tracker):
    """One row per record, a column per key (``step`` first, then in order of first appearance).

    Rows are appended as they come; a record with a key no row had before rewrites the file with
    the wider header. A continued run rewrites it from the records kept at its checkpoint.
    """

    key = "csv"

    def __init__(self, cfg=None) -> None:
        self.path: Optional[Path] = None
        self.rows: List[Dict[str, Any]] = []
        self.columns: List[str] = ["step"]
        self._file = None

    def start(self, run: RunInfo) -> None:
        self.path = Path(run.run_dir) / CSV_FILE
        self.rows = [dict(r) for r in run.records]
        for row in self.rows:
            self._add_columns(row)
        self._rewrite()
        return None

    def log(self, step: int, record: Dict[str, Any]) -> None:
        row = {"step": step, **record}
        self.rows.append(row)
        if self._add_columns(row):
            self._rewrite()
        else:
            self._writer().writerow(_cells(row, self.columns))
            self._file.flush()

    def finish(self, final: Dict[str, Any], files: Sequence[Path], status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _add_columns(self, row: Dict[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self) -> None:
        from ds_hydra.common.files import atomic_write_text

        if self._file is not None:
            self._file.close()
            self._file = None
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(self.columns)
        writer.writerows(_cells(row, self.columns) for row in self.rows)
        atomic_write_text(self.path, text.getvalue())

    def _writer(self):
        if self._file is None:
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        return csv.writer(self._file)


def _cells(row: Dict[str, Any], columns: List[str]) -> List[Any]:
    return ["" if row.get(c) is None else row.get(c) for c in columns]
