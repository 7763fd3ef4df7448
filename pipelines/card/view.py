"""What a stage sees of a finished run when it writes its own section of the dataset card.

A stage never imports the card: ``Stage.card_notes(view)`` receives a :class:`CardView`, with
lazy polars scans of the run's rows, the stage's own counts, summary and aggregate, and the
card's figures (one palette, log-axis ticks, images written beside the card).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipelines.card.figures import PALETTE, Palette, log_ticks, markdown_cell, new_figure, thumbnail_jpeg, to_png
from pipelines.card.stats import bin_edges, bin_index, collect, kept_columns, kept_scan, rows_with, write_asset
from pipelines.engine.rundir import RunDir
from schemas.manifest import Manifest, StageCounts


@dataclass
class CardView:
    """What a stage reads to write its part of the dataset card (``Stage.card_notes``)."""

    rundir: RunDir
    manifest: Manifest
    stage: str
    summary: object  # what the stage's ``describe`` recorded (global stages), else None
    colours: Palette = PALETTE

    # The run's rows ------------------------------------------------------------------------
    def kept(self, columns: list[str]) -> pl.LazyFrame | None:
        """A lazy scan of ``columns`` over the rows kept to the end; None when a column is not there."""
        return kept_scan(self.rundir, self.manifest, columns)

    def kept_columns(self) -> set[str]:
        """The columns the rows kept to the end have."""
        return kept_columns(self.rundir, self.manifest)

    def seen(self, schema: dict[str, pl.DataType]) -> pl.LazyFrame | None:
        """``schema``'s columns over every row, kept or rejected (null where a row never got the
        column), with ``group``: kept, rejected by this stage, or rejected by another one."""
        return rows_with(self.rundir, self.manifest, schema, self.stage)

    @staticmethod
    def collect(frame: pl.LazyFrame) -> pl.DataFrame:
        """Run a query on polars' streaming engine: memory bounded by its batches, not the run."""
        return collect(frame)

    def binned(self, frame: pl.LazyFrame, columns: list[str], bins: int = 40) -> tuple[np.ndarray, dict] | None:
        """Equal-width histograms of ``columns`` on shared edges (nulls left out): ``(edges,
        {column: counts})``; None when no column has a value."""
        bounds = collect(
            frame.select(
                pl.min_horizontal(*[pl.col(c).min() for c in columns]).alias("lo"),
                pl.max_horizontal(*[pl.col(c).max() for c in columns]).alias("hi"),
            )
        )
        lo, hi = bounds["lo"][0], bounds["hi"][0]
        if lo is None:
            return None
        edges = bin_edges(lo, hi, bins)
        counts = {}
        for column in columns:
            counts[column] = np.zeros(bins, np.int64)
            binned = frame.filter(pl.col(column).is_not_null()).select(bin_index(pl.col(column), edges))
            for b, n in collect(binned.group_by("bin").len()).iter_rows():
                counts[column][b] += n
        return edges, counts

    # The stage's own records ---------------------------------------------------------------
    def counts(self) -> StageCounts | None:
        """The stage's rows in, kept and rejected by reason, over the whole run."""
        return self.manifest.stage_totals().get(self.stage)

    def aggregate(self) -> Any:
        """The state a global stage aggregated (None for other stages, or when it is not saved)."""
        return self.rundir.load_aggregate(self.stage)[1]

    # Writing -------------------------------------------------------------------------------
    @staticmethod
    def figure(width: float, height: float) -> Any:
        """A matplotlib figure in the card's size units, drawn without pyplot."""
        return new_figure(width, height)

    @staticmethod
    def log_ticks(axis: Any) -> None:
        """Plain numbers (1, 10, 2k) as the ticks of a log axis."""
        log_ticks(axis)

    def plot(self, name: str, figure: Any, alt: str) -> str:
        """Write ``figure`` beside the card as a PNG; the markdown image that shows it."""
        return f"![{alt}]({self.write_asset(name, to_png(figure))})"

    def write_asset(self, name: str, data: bytes) -> str:
        """Write ``data`` beside the card; return the path to link it with."""
        return write_asset(self.rundir, f"{self.stage}-{name}", data)

    def image_link(self, name: str, data: bytes | None) -> str | None:
        """A thumbnail of encoded image ``data`` written beside the card as ``name``; the markdown
        image that shows it, or None when the bytes do not decode."""
        thumbnail = thumbnail_jpeg(data) if data else None
        return f"![{name}]({self.write_asset(name, thumbnail)})" if thumbnail else None

    @staticmethod
    def cell(text: str | None) -> str:
        """``text`` safe inside a markdown table cell."""
        return markdown_cell(text)
