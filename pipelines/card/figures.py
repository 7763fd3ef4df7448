"""Images of the dataset card: plots drawn with matplotlib's file-only Agg backend into PNG bytes,
in one palette; thumbnails."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.card.stats import KEPT, REJECTED_ELSEWHERE, REJECTED_HERE, Histogram
from pipelines.stage import Cutoff


@dataclass(frozen=True)
class Palette:
    """The colours of every card image, stages' plots included."""

    kept: str = "#2b8a3e"
    dropped: str = "#c92a2a"  # rejected (by this stage, where there is a choice)
    elsewhere: str = "#adb5bd"  # rejected by another stage
    before: str = "#868e96"  # a state before the stage acted
    warn: str = "#f08c00"


PALETTE = Palette()
_COLOURS = {KEPT: PALETTE.kept, REJECTED_HERE: PALETTE.dropped, REJECTED_ELSEWHERE: PALETTE.elsewhere}


def funnel_png(steps: list[tuple[str, int, int]]) -> bytes:
    """Horizontal bars, one per stage in order: rows kept, with the rows it rejected beside them.
    ``steps`` are ``(stage, rows in, rows kept)``."""
    figure = new_figure(8, 0.9 + 0.36 * len(steps))
    axes = figure.subplots()
    y = np.arange(len(steps))
    kept = np.array([s[2] for s in steps])
    dropped = np.array([s[1] - s[2] for s in steps])
    axes.barh(y, kept, color=PALETTE.kept, label="kept")
    axes.barh(y, dropped, left=kept, color=PALETTE.dropped, alpha=0.7, label="rejected")
    widest = max(int((kept + dropped).max()), 1)
    for i, (_, rows_in, rows_kept) in enumerate(steps):
        label = f"{rows_kept:,}" + (f"  (−{rows_in - rows_kept:,})" if rows_in > rows_kept else "")
        axes.text(rows_in + widest * 0.01, i, label, va="center", fontsize=8)
    axes.set_yticks(y, [s[0] for s in steps], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, widest * 1.25)
    axes.set_xlabel("rows")
    axes.set_title("Funnel: rows kept after each stage", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    return to_png(figure)


def histogram_png(histogram: Histogram, cutoffs: list[Cutoff], title: str) -> bytes:
    """Stacked histogram (kept, rejected by the stage, rejected by others) with cutoffs marked."""
    figure = new_figure(7, 3.6)
    axes = figure.subplots()
    edges = histogram.edges
    widths = edges[1:] - edges[:-1]
    bottom = None
    for group in (KEPT, REJECTED_HERE, REJECTED_ELSEWHERE):
        counts = histogram.counts[group]
        if not counts.any():
            continue
        axes.bar(
            edges[:-1],
            counts,
            width=widths,
            align="edge",
            bottom=bottom,
            color=_COLOURS[group],
            label=f"{group} ({int(counts.sum()):,})",
            linewidth=0,
        )
        bottom = counts if bottom is None else bottom + counts
    for cutoff in cutoffs:
        axes.axvline(cutoff.value, color="black", linestyle="--", linewidth=1)
        axes.annotate(
            f"{cutoff.label}: {cutoff.value:.4g}",
            (cutoff.value, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -12),
            textcoords="offset points",
            fontsize=8,
        )
    axes.set_xlabel(histogram.column)
    axes.set_ylabel("rows")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper left")
    return to_png(figure)


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure drawn by the Agg canvas: no pyplot, so no global state and no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def log_ticks(axis: Any) -> None:
    """Log-axis ticks as plain numbers (1, 10, 1,000), with 2 and 5 between decades too when
    the axis spans fewer than three (else it would show one label or none)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = axis.get_view_interval()
    subs = (1.0, 2.0, 5.0) if lo > 0 and hi / lo < 1000 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axis.set_minor_formatter(NullFormatter())


def compact(value: float) -> str:
    """A tick label: 7, 150, 2k, 30M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def to_png(figure: Any) -> bytes:
    """The figure, laid out, as PNG bytes."""
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def thumbnail_jpeg(data: bytes, size: int = 160) -> bytes | None:
    """A JPEG thumbnail (longest side ``size``) of encoded image ``data``; None if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=85)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def markdown_cell(text: str | None) -> str:
    """``text`` safe inside a markdown table cell."""
    return (text or "").replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
