"""Figures drawn off-screen with matplotlib's object API: no pyplot (less to import at the end of every
run, no global figure state), saved atomically (a reader never sees half a PNG)."""
from __future__ import annotations

from pathlib import Path


def new_figure(width: float, height: float, **subplots):
    """``(figure, axes)`` of ``figure.subplots(**subplots)`` on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.subplots(**subplots)


def save_figure(figure, path: Path) -> None:
    from ds_hydra.common.files import atomic_write

    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100), binary=True)
