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

from pipelines.engine.rundir import REJECTS_DIR, RunDir
from schemas.manifest import Manifest
from schemas.rejects import STAGE

#: Where the card's images go, beside its README.md.
CARD_ASSETS = "card"
#: Groups of a score histogram, in stacking order.
KEPT, REJECTED_HERE, REJECTED_ELSEWHERE = "kept", "rejected by this stage", "rejected by another stage"
#: Column of :func:`rows_with` that says which group a row is in.
GROUP = "group"


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


def write_asset(rundir: RunDir, name: str, data: bytes) -> str:
    """Write ``data`` as ``card/<name>`` of the run; return the relative path the card links."""
    relative = f"{CARD_ASSETS}/{name}"
    rundir.write_bytes(rundir.path(relative), data)
    return relative


#: URI schemes polars opens itself; a run on any other filesystem is read through a pyarrow dataset.
_POLARS_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "http", "https", "hf")


def scan_files(rundir: RunDir, paths: list[str], schema: dict[str, pl.DataType] | None = None) -> pl.LazyFrame:
    """A lazy scan of parquet ``paths`` of the run. With ``schema``: exactly those columns, null
    where a file lacks one, wider float types where a file has narrower ones."""
    scheme = rundir.uri.partition("://")[0] if "://" in rundir.uri else "file"
    if scheme in _POLARS_SCHEMES:
        uris = [rundir.uri_of(path) for path in paths]
        if schema is None:
            return pl.scan_parquet(uris)
        return pl.scan_parquet(
            uris,
            schema=schema,
            missing_columns="insert",
            extra_columns="ignore",
            cast_options=pl.ScanCastOptions(float_cast="upcast"),
        )
    import pyarrow.dataset as ds

    arrow = pl.DataFrame(schema=schema).to_arrow().schema if schema is not None else None
    return pl.scan_pyarrow_dataset(ds.dataset(paths, filesystem=rundir.fs, format="parquet", schema=arrow))


def kept_files(rundir: RunDir, manifest: Manifest) -> list[str]:
    """The parquet files of the rows kept to the end (the final phase)."""
    final = manifest.final_phase
    return rundir.parquet_files(final) if final else []


def kept_scan(rundir: RunDir, manifest: Manifest, columns: list[str]) -> pl.LazyFrame | None:
    """A lazy scan of ``columns`` over the rows kept to the end; None when a column is not there."""
    files = kept_files(rundir, manifest)
    if not files:
        return None
    frame = scan_files(rundir, files)
    if not set(columns) <= set(frame.collect_schema().names()):
        return None
    return frame.select(columns)


def kept_columns(rundir: RunDir, manifest: Manifest) -> set[str]:
    """Names of the columns the kept rows have (read from the files' footers only)."""
    files = kept_files(rundir, manifest)
    return set(scan_files(rundir, files).collect_schema().names()) if files else set()


def rows_with(rundir: RunDir, manifest: Manifest, schema: dict[str, pl.DataType], stage: str) -> pl.LazyFrame | None:
    """``schema``'s columns over every row, kept or rejected, plus :data:`GROUP`: kept to the end,
    rejected by ``stage``, or rejected by another stage. A row that lacks a column (rejected
    before it was written) has a null there. None when no file has any of the columns."""
    parts = []
    kept = kept_scan(rundir, manifest, list(schema))
    if kept is not None:
        parts.append(kept.select(*[pl.col(c).cast(t) for c, t in schema.items()], pl.lit(KEPT).alias(GROUP)))
    for phase in manifest.phases:
        files = rundir.parquet_files(f"{REJECTS_DIR}/{phase.name}")
        if not files:
            continue
        rejects = scan_files(rundir, files, {STAGE: pl.String, **schema})
        parts.append(
            rejects.select(
                *schema,
                pl.when(pl.col(STAGE) == stage)
                .then(pl.lit(REJECTED_HERE))
                .otherwise(pl.lit(REJECTED_ELSEWHERE))
                .alias(GROUP),
            )
        )
    return pl.concat(parts) if parts else None


def score_histogram(rundir: RunDir, manifest: Manifest, column: str, stage: str, bins: int = 50) -> Histogram | None:
    """Histogram of ``column`` over every row that got a value: kept at the end, rejected by
    ``stage``, or rejected by another stage afterwards. None when no row has a value."""
    frame = rows_with(rundir, manifest, {column: pl.Float64}, stage)
    if frame is None:
        return None
    frame = frame.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan())
    bounds = frame.select(
        pl.col(column).min().alias("lo"),
        pl.col(column).max().alias("hi"),
        *[pl.col(column).quantile(q).alias(str(q)) for q in (0.1, 0.5, 0.9)],
    )
    bounds = collect(bounds)
    lo, hi = bounds["lo"][0], bounds["hi"][0]
    if lo is None:
        return None
    edges = bin_edges(lo, hi, bins)
    binned = collect(frame.with_columns(bin_index(pl.col(column), edges)).group_by("bin", GROUP).len())
    counts = {group: np.zeros(bins, dtype=np.int64) for group in (KEPT, REJECTED_HERE, REJECTED_ELSEWHERE)}
    for b, group, n in binned.iter_rows():
        counts[group][b] += n
    return Histogram(column, edges, counts, {q: float(bounds[str(q)][0]) for q in (0.1, 0.5, 0.9)})


def collect(frame: pl.LazyFrame) -> pl.DataFrame:
    """Run a card query on polars' streaming engine: memory bounded by its batches, not the run."""
    return frame.collect(engine="streaming")


def bin_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` equal-width edges from ``lo`` to ``hi`` (widened when they are equal)."""
    if hi <= lo:
        hi = lo + 1e-6
    return np.linspace(lo, hi, bins + 1)


def bin_index(value: pl.Expr, edges: np.ndarray) -> pl.Expr:
    """The bin of ``value`` among equal-width ``edges`` (the last bin includes its right edge), as ``bin``."""
    lo, width, bins = float(edges[0]), float(edges[1] - edges[0]), len(edges) - 1
    return ((value - lo) / width).floor().clip(0, bins - 1).cast(pl.Int32).alias("bin")
