"""Reading a finished (or interrupted) run back: its ledger and lazy column statistics.

Statistics are one polars lazy query over the phase's parquet files, so they cost a scan of the
columns involved, not a load of the run into memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipelines.card.stats import scan_files
from pipelines.engine.rundir import RunDir
from schemas.manifest import Manifest


@dataclass
class ColumnStats:
    """Summary of one column of a phase: type, nulls, and a range for numbers or text lengths."""

    name: str
    dtype: str
    nulls: int
    minimum: float | None = None
    mean: float | None = None
    maximum: float | None = None
    measure: str = ""  # "value", "characters" or "bytes"


def load_manifest(run: str) -> Manifest:
    manifest = RunDir(run).read_manifest()
    if manifest is None:
        raise ValueError(f"{run!r} is not a run directory (no manifest.json)")
    return manifest


def column_stats(run: str, phase: str) -> tuple[int, list[ColumnStats]]:
    """Row count and per-column statistics of a phase, computed lazily with polars."""
    frame = _scan(run, phase)
    schema = frame.collect_schema()
    exprs = [pl.len().alias("__rows")]
    for name, dtype in schema.items():
        col = pl.col(name)
        exprs.append(col.null_count().alias(f"{name}__nulls"))
        measured = _measured(col, dtype)
        if measured is not None:
            exprs += [
                measured.min().alias(f"{name}__min"),
                measured.mean().alias(f"{name}__mean"),
                measured.max().alias(f"{name}__max"),
            ]
    row = frame.select(exprs).collect().row(0, named=True)
    stats = []
    for name, dtype in schema.items():
        stats.append(
            ColumnStats(
                name=name,
                dtype=str(dtype),
                nulls=row[f"{name}__nulls"],
                minimum=row.get(f"{name}__min"),
                mean=row.get(f"{name}__mean"),
                maximum=row.get(f"{name}__max"),
                measure=_measure_name(dtype),
            )
        )
    return row["__rows"], stats


def _measured(col: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    if dtype.is_numeric():
        return col.cast(pl.Float64)
    if dtype == pl.String:
        return col.str.len_chars()
    if dtype == pl.Binary:
        return col.bin.size()
    if isinstance(dtype, pl.List):
        return col.list.len()
    return None


def _measure_name(dtype: pl.DataType) -> str:
    if dtype.is_numeric():
        return "value"
    return {pl.String: "characters", pl.Binary: "bytes"}.get(dtype, "items" if isinstance(dtype, pl.List) else "")


def list_value_counts(run: str, phase: str, column: str) -> dict[int, int]:
    """How many rows of a phase hold each value of a list column (e.g. MetaCLIP entry ids)."""
    counts = _scan(run, phase).select(pl.col(column).explode().drop_nulls()).group_by(column).len().collect()
    return dict(zip(counts[column].to_list(), counts["len"].to_list()))


def _scan(run: str, phase: str) -> pl.LazyFrame:
    """A lazy scan of a phase's kept rows, wherever the run directory is."""
    rundir = RunDir(run)
    files = rundir.parquet_files(phase)
    if not files:
        raise ValueError(f"phase {phase!r} of {run!r} has no rows written")
    return scan_files(rundir, files)
