"""Images of the dataset card: plots drawn with matplotlib's file-only Agg backend into PNG bytes, thumbnails."""

from __future__ import annotations

import io
from typing import Any

from pipelines.card.stats import KEPT, REJECTED_ELSEWHERE, REJECTED_HERE, Histogram
from pipelines.stage import Cutoff

KEPT_COLOUR, REJECTED_COLOUR = "#2b8a3e", "#c92a2a"  # shared by every card image
_COLOURS = {KEPT: KEPT_COLOUR, REJECTED_HERE: REJECTED_COLOUR, REJECTED_ELSEWHERE: "#adb5bd"}


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
