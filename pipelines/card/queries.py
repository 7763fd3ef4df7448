"""What the dataset card's topic sections plot: MetaCLIP entry frequency, dedup cluster sizes,
CapFilt caption sources, instruction types and sample pairs.

Every query is a polars lazy scan of only the columns it needs (or a read of a small global
aggregate), so its cost grows with the columns' size, never with what else a row holds; the
results are small (one number per entry, per cluster size, per bin, per response type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pipelines.card.stats import (
    bin_edges,
    bin_index,
    collect,
    kept_columns,
    kept_files,
    kept_scan,
    rows_with,
    scan_files,
)
from pipelines.engine.rundir import REJECTS_DIR, RunDir
from schemas.columns import (
    BRIEF_RECORDS,
    CAPTION,
    CAPTION_SCORES,
    CAPTION_SOURCE,
    IMAGE,
    INSTRUCTION_FAILURES,
    INSTRUCTIONS,
    METACLIP_ENTRIES,
    UID,
    WEB_CAPTION,
)
from schemas.manifest import Manifest
from schemas.rejects import DETAIL, REASON, STAGE


@dataclass
class EntryFrequency:
    """Matches per MetaCLIP entry id before balancing (the balance stage's global counts) and
    among the rows kept to the end."""

    after: np.ndarray
    before: np.ndarray | None = None
    threshold: int | None = None

    @staticmethod
    def ranked(counts: np.ndarray) -> np.ndarray:
        """The non-zero counts, largest first: y of a rank-frequency plot."""
        return np.sort(counts[counts > 0])[::-1]

    def kept_share(self, head: bool) -> float | None:
        """Share of the matches of head (count above ``t``) or tail entries that were kept."""
        if self.before is None or self.threshold is None:
            return None
        size = max(len(self.before), len(self.after))
        before = np.pad(self.before, (0, size - len(self.before)))
        after = np.pad(self.after, (0, size - len(self.after)))
        chosen = before > self.threshold if head else (before > 0) & (before <= self.threshold)
        total = before[chosen].sum()
        return float(after[chosen].sum() / total) if total else None


def entry_frequency(rundir: RunDir, manifest: Manifest, balance_state: Any = None) -> EntryFrequency | None:
    """Entry counts among kept rows, with ``balance_state`` (a MetaclipBalance aggregate: ``counts``
    per entry id and ``threshold``) as the before. None when there is neither."""
    has_state = isinstance(balance_state, dict) and isinstance(balance_state.get("counts"), np.ndarray)
    kept = kept_scan(rundir, manifest, [METACLIP_ENTRIES])
    if kept is None and not has_state:
        return None
    after = np.zeros(0, np.int64)
    if kept is not None:
        counts = collect(
            kept.select(pl.col(METACLIP_ENTRIES).explode().drop_nulls().alias("entry")).group_by("entry").len()
        )
        ids, n = counts["entry"].to_numpy().astype(np.int64), counts["len"].to_numpy().astype(np.int64)
        after = np.zeros(int(ids.max()) + 1 if len(ids) else 0, np.int64)
        after[ids] = n
    frequency = EntryFrequency(after)
    if has_state:
        frequency.before = balance_state["counts"].astype(np.int64)
        threshold = balance_state.get("threshold")
        frequency.threshold = int(threshold) if threshold is not None else None
    return frequency


@dataclass
class ClusterSizes:
    """How many duplicate clusters of each size one dedup stage found."""

    stage: str
    clusters: dict[int, int]  # size -> clusters of that size
    rows: int
    duplicate_rows: int


def cluster_sizes(manifest: Manifest) -> list[ClusterSizes]:
    """The cluster-size histograms the dedup stages recorded in the manifest, in pipeline order."""
    found = []
    for stage, summary in manifest.aggregates.items():
        if isinstance(summary, dict) and isinstance(summary.get("size_histogram"), dict):
            clusters = {int(size): int(n) for size, n in summary["size_histogram"].items()}
            found.append(
                ClusterSizes(
                    stage,
                    dict(sorted(clusters.items())),
                    int(summary.get("rows", 0)),
                    int(summary.get("duplicate_rows", 0)),
                )
            )
    return found


@dataclass
class CaptionSources:
    """What CapFilt did: kept rows by caption source, rows it rejected, and the scores it saw."""

    web: int
    synthetic: int
    rejected: int
    #: Histograms over every row the filter scored (kept or rejected, by it or later).
    edges: np.ndarray | None = None
    web_scores: np.ndarray | None = None
    best_synthetic_scores: np.ndarray | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)


def caption_sources(
    rundir: RunDir, manifest: Manifest, stage: str, bins: int = 40, examples: int = 4
) -> CaptionSources | None:
    """CapFilt's effect, from the ``caption_source`` and ``caption_scores`` columns; ``stage``
    is the ledger name of the stage that selects captions. None when kept rows have no source."""
    kept = kept_scan(rundir, manifest, [CAPTION_SOURCE])
    if kept is None:
        return None
    counts = dict(collect(kept.group_by(CAPTION_SOURCE).len()).iter_rows())
    rejected = manifest.stage_totals().get(stage)
    result = CaptionSources(counts.get("web", 0), counts.get("synthetic", 0), rejected.rows_rejected if rejected else 0)
    scored = rows_with(rundir, manifest, {CAPTION_SCORES: pl.List(pl.Float64)}, stage)
    if scored is not None:
        scores = scored.select(
            pl.col(CAPTION_SCORES).list.first().alias("web"),
            pl.col(CAPTION_SCORES).list.slice(1).list.max().alias("synthetic"),
        ).filter(pl.col("web").is_not_null())
        bounds = collect(
            scores.select(
                pl.min_horizontal(pl.col("web").min(), pl.col("synthetic").min()).alias("lo"),
                pl.max_horizontal(pl.col("web").max(), pl.col("synthetic").max()).alias("hi"),
            )
        )
        lo, hi = bounds["lo"][0], bounds["hi"][0]
        if lo is not None:
            result.edges = bin_edges(lo, hi, bins)
            result.web_scores = _binned(scores, "web", result.edges)
            result.best_synthetic_scores = _binned(scores, "synthetic", result.edges)
    names = kept_columns(rundir, manifest)
    if {WEB_CAPTION, CAPTION} <= names:
        columns = [WEB_CAPTION, CAPTION] + ([CAPTION_SCORES] if CAPTION_SCORES in names else [])
        result.examples = (
            kept_scan(rundir, manifest, [*columns, CAPTION_SOURCE])
            .filter(pl.col(CAPTION_SOURCE) == "synthetic")
            .head(examples)
            .select(columns)
            .collect()
            .to_dicts()
        )
    return result


def _binned(frame: pl.LazyFrame, column: str, edges: np.ndarray) -> np.ndarray:
    counts = np.zeros(len(edges) - 1, np.int64)
    binned = frame.filter(pl.col(column).is_not_null()).select(bin_index(pl.col(column), edges)).group_by("bin").len()
    for b, n in collect(binned).iter_rows():
        counts[b] += n
    return counts


@dataclass
class InstructionTypes:
    """Instruction records kept, by response type, and what failed."""

    records: dict[str, int]  # response type -> records in kept rows
    rows: int  # kept rows with at least one record
    #: (response type, reason) -> response types that failed in rows kept for their other types.
    failed: dict[tuple[str, str], int]
    rejected: dict[str, int]  # reason -> rows rejected by the instruction stages (the ledger)


def instruction_types(rundir: RunDir, manifest: Manifest, stages: list[str]) -> InstructionTypes | None:
    """Records per response type in the ``instructions`` and ``brief_records`` of kept rows; rows
    the instruction ``stages`` rejected, by reason. None when kept rows have neither column."""
    names = kept_columns(rundir, manifest)
    present = [c for c in (INSTRUCTIONS, BRIEF_RECORDS) if c in names]
    if not present:
        return None
    kept = kept_scan(rundir, manifest, present)
    kinds = pl.concat([kept.select(pl.col(c).explode().struct.field("response_type").alias("type")) for c in present])
    records = dict(collect(kinds.drop_nulls().group_by("type").len()).sort("type").iter_rows())
    rows = kept.select(pl.sum_horizontal(*[pl.col(c).list.len().fill_null(0) for c in present]).alias("n"))
    with_records = int(collect(rows.filter(pl.col("n") > 0).select(pl.len())).item())
    failed: dict[tuple[str, str], int] = {}
    if INSTRUCTION_FAILURES in names:
        failures = collect(
            kept_scan(rundir, manifest, [INSTRUCTION_FAILURES])
            .select(pl.col(INSTRUCTION_FAILURES).explode().struct.unnest())
            .drop_nulls("reason")
            .group_by("response_type", "reason")
            .len()
        )
        failed = {(kind, reason): n for kind, reason, n in failures.iter_rows()}
    totals = manifest.stage_totals()
    rejected: dict[str, int] = {}
    for stage in stages:
        for reason, n in totals[stage].rejected.items() if stage in totals else ():
            rejected[reason] = rejected.get(reason, 0) + n
    return InstructionTypes(records, with_records, failed, rejected)


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
