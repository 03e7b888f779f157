"""The sweep report: ``sweep_summary.csv``, ``sweep_summary.md`` and ``sweep_summary.png``.

One row per job (overrides, final train/val loss, tokens/s, activation memory, status, directory),
built from the ``sweep_job.json`` records the callback leaves in each job's directory. The best
completed job (lowest ``objective``, else lowest val loss) is marked; failed jobs keep their row and
their error. The plot shows the val loss of each job and every job's loss curve overlaid, read
from the jobs' ``metrics.jsonl``.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ds_hydra.sweeps.records import collect_job_records

log = logging.getLogger(__name__)

SUMMARY_FILES = ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.png")
COLUMNS = ("job", "overrides", "status", "train_loss", "val_loss", "tokens_per_s", "activation_bytes", "wall_s", "best", "error", "dir")
_PLOT_LEGEND_MAX = 12  # more jobs than this: curves without a legend entry each


@dataclass
class SweepReport:
    records: List[Dict[str, Any]]
    best: Optional[int]  # job number of the best completed job
    csv: Path
    markdown: Path
    png: Optional[Path]


def write_sweep_report(
    sweep_dir: Path,
    sweep_id: Optional[str] = None,
    objective: Optional[str] = None,
    maximize: bool = False,
    wall_s: Optional[float] = None,
    plot: bool = True,
) -> SweepReport:
    sweep_dir = Path(sweep_dir)
    records = collect_job_records(sweep_dir, sweep_id)
    metric = objective or "val_loss"
    best = best_job(records, metric, maximize)
    report = SweepReport(
        records=records,
        best=best,
        csv=sweep_dir / SUMMARY_FILES[0],
        markdown=sweep_dir / SUMMARY_FILES[1],
        png=sweep_dir / SUMMARY_FILES[2] if plot else None,
    )
    if not records:
        return report
    common = common_overrides(records)
    rows = [_row(r, sweep_dir, best, common) for r in records]
    _write_csv(report.csv, rows)
    text = _markdown(rows, records, sweep_dir, metric, best, wall_s, maximize, common)
    report.markdown.write_text(text, encoding="utf-8")
    if plot:
        try:
            plot_sweep(records, rows, report.png, metric)
        except Exception as exc:  # the tables matter more than the picture
            log.warning("could not draw %s: %s", report.png, exc)
            report.png = None
    return report


def best_job(records: List[Dict[str, Any]], metric: str, maximize: bool = False) -> Optional[int]:
    scored = [
        (r["metrics"][metric], r["num"])
        for r in records
        if r["status"] == "completed" and isinstance(r.get("metrics", {}).get(metric), (int, float))
    ]
    if not scored:
        return None
    return (max if maximize else min)(scored)[1]


def common_overrides(records: List[Dict[str, Any]]) -> List[str]:
    """Overrides every job shares (shown once in the header); rows show only what varies."""
    if len(records) < 2:
        return []
    shared = set(records[0].get("overrides", []))
    for record in records[1:]:
        shared &= set(record.get("overrides", []))
    return [o for o in records[0].get("overrides", []) if o in shared]


def _row(record: Dict[str, Any], sweep_dir: Path, best: Optional[int], common: List[str]) -> Dict[str, Any]:
    metrics = record.get("metrics") or {}
    job_dir = Path(record.get("dir", ""))
    try:
        shown_dir = str(job_dir.resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        shown_dir = str(job_dir)
    return {
        "job": record["num"],
        "overrides": " ".join(o for o in record.get("overrides", []) if o not in common),
        "status": record["status"],
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "activation_bytes": metrics.get("activation_bytes"),
        "wall_s": metrics.get("wall_s", record.get("job_wall_s")),
        "best": record["num"] == best,
        "error": record.get("error") or "",
        "dir": shown_dir,
    }


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})


def _markdown(rows, records, sweep_dir: Path, metric: str, best, wall_s, maximize: bool, common: List[str]) -> str:
    failed = sum(r["status"] != "completed" for r in rows)
    lines = [f"# Sweep summary: {sweep_dir}", ""]
    summary = f"{len(rows)} jobs, {len(rows) - failed} completed, {failed} failed"
    if wall_s is not None:
        summary += f", {wall_s:.1f} s"
    lines.append(summary + ".")
    if common:
        lines.append(f"Every job: `{' '.join(common)}`.")
    if best is not None:
        best_value = next(r["metrics"][metric] for r in records if r["num"] == best)
        best_row = next(r for r in rows if r["job"] == best)
        lines.append(f"Best ({'highest' if maximize else 'lowest'} {metric}) is job {best}: {metric} {best_value:.4f} with `{best_row['overrides'] or '(no overrides)'}`.")
    lines += [
        "",
        "| job | overrides | status | train loss | val loss | tokens/s | activation memory | wall s | dir |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        status = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        job = f"{row['job']} (best)" if row["best"] else str(row["job"])
        cells = [
            job,
            f"`{row['overrides']}`" if row["overrides"] else "",
            status,
            _fmt(row["train_loss"], "{:.4f}"),
            _fmt(row["val_loss"], "{:.4f}"),
            _fmt(row["tokens_per_s"], "{:,.0f}"),
            format_bytes(row["activation_bytes"]),
            _fmt(row["wall_s"], "{:.1f}"),
            row["dir"],
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str) -> str:
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def format_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def plot_sweep(records: List[Dict[str, Any]], rows: List[Dict[str, Any]], path: Path, metric: str) -> None:
    """Left: the final ``metric`` of each job (best ringed, failed crossed). Right: every job's loss curve."""
    import matplotlib

    from ds_hydra.plotting import new_figure, save_figure
    from ds_hydra.training.metrics import read_metrics

    fig, (ax_bar, ax_curve) = new_figure(13, 4.5, ncols=2, gridspec_kw={"width_ratios": [1, 1.4]})
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = list(range(len(rows)))
    failed_x: List[int] = []
    for x, record, row in zip(xs, records, rows):
        color = colors[x % len(colors)]
        value = (record.get("metrics") or {}).get(metric)
        if row["status"] != "completed" or not isinstance(value, (int, float)):
            failed_x.append(x)
            continue
        ax_bar.plot([x], [value], "o", color=color, markersize=12 if row["best"] else 8,
                    markeredgecolor="black" if row["best"] else color, markeredgewidth=2)
        ax_bar.annotate(f"{value:.3f}" + (" best" if row["best"] else ""), (x, value), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
        history = read_metrics(Path(record["dir"]))
        steps = [r["step"] for r in history if isinstance(r.get("loss"), (int, float))]
        label = f"{row['job']}: {row['overrides']}"[:60] if len(rows) <= _PLOT_LEGEND_MAX else None
        if steps:
            ax_curve.plot(steps, [r["loss"] for r in history if isinstance(r.get("loss"), (int, float))],
                          color=color, alpha=0.8, label=label)
        evals = [r for r in history if isinstance(r.get("val_loss"), (int, float))]
        if evals:
            ax_curve.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", color=color, markersize=3,
                          label=None if steps else label)
    values = [v for v in ((r.get("metrics") or {}).get(metric) for r in records) if isinstance(v, (int, float))]
    if values:  # zoom onto the values: sweeps differ by a few percent, not from zero
        low, high = min(values), max(values)
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
        ax_bar.set_ylim(low - pad, high + pad)
    for x in failed_x:  # failed jobs: a red cross on the bottom edge
        ax_bar.plot([x], [0.02], marker="x", color="red", markersize=10, transform=ax_bar.get_xaxis_transform())
        ax_bar.annotate("failed", (x, 0.06), xycoords=("data", "axes fraction"), ha="center", color="red", fontsize=8)
    ax_bar.set_xlim(-0.6, len(rows) - 0.4)
    ax_bar.set_xticks(xs)
    ax_bar.set_xticklabels([str(row["job"]) for row in rows])
    ax_bar.set_xlabel("job")
    ax_bar.set_ylabel(f"final {metric}")
    ax_bar.set_title(f"{metric} per job")
    ax_bar.grid(axis="y", alpha=0.3)
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("loss (solid: train batches, dashed: val)")
    ax_curve.set_title("loss curves")
    ax_curve.grid(alpha=0.3)
    if ax_curve.get_legend_handles_labels()[0]:
        ax_curve.legend(fontsize=7)
    save_figure(fig, path)
