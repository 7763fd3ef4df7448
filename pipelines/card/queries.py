"""The dataset card's own queries: sample pairs of the kept rows and examples of rejected ones.

Each reads a few row groups of a few files, whatever the run's size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipelines.card.stats import collect, kept_columns, kept_files, scan_files
from pipelines.engine.rundir import REJECTS_DIR, RunDir
from schemas.columns import CAPTION, CAPTION_SOURCE, IMAGE, UID
from schemas.manifest import Manifest
from schemas.rejects import DETAIL, REASON, STAGE


def sample_rows(rundir: RunDir, manifest: Manifest, count: int = 8) -> list[dict[str, Any]]:
    """Up to ``count`` kept rows (uid, caption, and image and caption source where the run has
    them), taken from the heads of shards spread across the final phase: a few row groups read."""
    files = kept_files(rundir, manifest)
    names = kept_columns(rundir, manifest)
    if not files or not {UID, CAPTION} <= names:
        return []
    columns = [UID, CAPTION] + [c for c in (IMAGE, CAPTION_SOURCE) if c in names]
    picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(count, len(files)))})
    rows: list[dict[str, Any]] = []
    for pick in picks:
        frame = scan_files(rundir, [files[pick]]).select(columns)
        if IMAGE in columns:
            frame = frame.filter(pl.col(IMAGE).is_not_null())
        rows += frame.head(-(-count // len(picks))).collect().to_dicts()
    return rows[:count]


def reject_examples(
    rundir: RunDir, manifest: Manifest, per_stage: int = 3, files_per_phase: int = 4
) -> dict[str, list[dict[str, Any]]]:
    """Up to ``per_stage`` rejected rows (reason, detail, caption) of each stage that rejected any,
    from the first ``files_per_phase`` reject files of each phase: a few files read, whatever the
    pool's size, so a stage that rejects rarely may show none."""
    schema = {STAGE: pl.String, REASON: pl.String, DETAIL: pl.String, CAPTION: pl.String}
    examples: dict[str, list[dict[str, Any]]] = {}
    for phase in manifest.phases:
        files = rundir.parquet_files(f"{REJECTS_DIR}/{phase.name}")[:files_per_phase]
        if not files:
            continue
        frame = collect(
            scan_files(rundir, files, schema).select(*schema).group_by(STAGE, maintain_order=True).head(per_stage)
        )
        for row in frame.to_dicts():
            examples.setdefault(row.pop(STAGE), []).append(row)
    return examples
