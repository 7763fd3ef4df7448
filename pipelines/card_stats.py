"""Statistics for the dataset card, each one polars lazy query over the run's parquet files.

Queries read only the columns they need, so the card of a 100M-row run costs a scan of those
columns, never a load of the run into memory. Rows are found in two places: those that reached
the end are in the final phase's shards, those that left are reject records (which carry the
row's light columns, so a score survives the rejection that it caused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pipelines.rundir import REJECTS_DIR, RunDir
from schemas.manifest import Manifest
from schemas.rejects import STAGE

#: Where the card's images go, beside its README.md.
CARD_ASSETS = "card"
#: Groups of a score histogram, in stacking order.
KEPT, REJECTED_HERE, REJECTED_ELSEWHERE = "kept", "rejected by this stage", "rejected by another stage"


@dataclass
class Histogram:
    """Counts of a numeric column in equal-width bins, split by what became of each row."""

    column: str
    edges: np.ndarray
    counts: dict[str, np.ndarray]  # group -> counts per bin
    quantiles: dict[float, float]

    @property
    def total(self) -> int:
        return int(sum(c.sum() for c in self.counts.values()))


@dataclass
class CardView:
    """What a stage reads to write its part of the dataset card (``Stage.card_notes``)."""

    rundir: RunDir
    manifest: Manifest
    stage: str
    summary: object  # what the stage's ``describe`` recorded (global stages), else None

    def kept(self, columns: list[str]) -> pl.LazyFrame | None:
        """A lazy scan of ``columns`` over the rows kept to the end; None when a column is not there."""
        final = self.manifest.final_phase
        files = parquet_uris(self.rundir, final) if final else []
        if not files:
            return None
        frame = pl.scan_parquet(files)
        if not set(columns) <= set(frame.collect_schema().names()):
            return None
        return frame.select(columns)

    def write_asset(self, name: str, data: bytes) -> str:
        """Write ``data`` beside the card; return the path to link it with."""
        relative = f"{CARD_ASSETS}/{self.stage}-{name}"
        self.rundir.write_bytes(self.rundir.path(relative), data)
        return relative


def parquet_uris(rundir: RunDir, folder: str) -> list[str]:
    """Every finished parquet file directly under ``folder`` (temporaries excluded), as URIs."""
    return [rundir.uri_of(path) for path in rundir.parquet_files(folder)]


def score_histogram(rundir: RunDir, manifest: Manifest, column: str, stage: str, bins: int = 50) -> Histogram | None:
    """Histogram of ``column`` over every row that got a value: kept at the end, rejected by
    ``stage``, or rejected by another stage afterwards. None when no row has a value."""
    frame = _values(rundir, manifest, column, stage)
    if frame is None:
        return None
    bounds = frame.select(pl.col(column).min().alias("lo"), pl.col(column).max().alias("hi"),
                          *[pl.col(column).quantile(q).alias(str(q)) for q in (0.1, 0.5, 0.9)]).collect()
    lo, hi = bounds["lo"][0], bounds["hi"][0]
    if lo is None:
        return None
    if hi <= lo:
        hi = lo + 1e-6
    width = (hi - lo) / bins
    binned = (frame.with_columns(((pl.col(column) - lo) / width).floor().clip(0, bins - 1).cast(pl.Int32).alias("bin"))
              .group_by("bin", "group").len().collect())
    counts = {group: np.zeros(bins, dtype=np.int64) for group in (KEPT, REJECTED_HERE, REJECTED_ELSEWHERE)}
    for b, group, n in binned.iter_rows():
        counts[group][b] += n
    return Histogram(column, np.linspace(lo, hi, bins + 1), counts,
                     {q: float(bounds[str(q)][0]) for q in (0.1, 0.5, 0.9)})


def _values(rundir: RunDir, manifest: Manifest, column: str, stage: str) -> pl.LazyFrame | None:
    parts = []
    final = manifest.final_phase
    kept_files = parquet_uris(rundir, final) if final else []
    if kept_files:
        kept = pl.scan_parquet(kept_files)
        if column in kept.collect_schema():
            parts.append(kept.select(pl.col(column).cast(pl.Float64), pl.lit(KEPT).alias("group")))
    for phase in manifest.phases:
        files = parquet_uris(rundir, f"{REJECTS_DIR}/{phase.name}")
        if not files:
            continue
        rejects = pl.scan_parquet(files, schema={STAGE: pl.String, column: pl.Float64},
                                  missing_columns="insert", extra_columns="ignore", cast_options=pl.ScanCastOptions(
                                      float_cast="upcast"))
        parts.append(rejects.filter(pl.col(column).is_not_null()).select(
            pl.col(column),
            pl.when(pl.col(STAGE) == stage).then(pl.lit(REJECTED_HERE)).otherwise(pl.lit(REJECTED_ELSEWHERE))
            .alias("group")))
    if not parts:
        return None
    return pl.concat(parts).filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan())
