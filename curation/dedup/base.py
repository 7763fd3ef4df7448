"""What every dedup stage shares: the survivor policy, the decision, and its summary.

A dedup stage is a global two-pass step. ``compute`` turns each shard into the detector's
features (hashes, MinHash bands, embeddings) plus the row's uid, ``source_index`` and survivor
preference; ``aggregate`` finds duplicate edges over the whole pool (subclasses: ``edges``),
clusters them and picks one survivor per cluster; ``decide`` rejects every other row with the
survivor's uid in the detail. The decision is one row per duplicate (its ``source_index``, the
survivor's uid, the cluster's size), returned as :class:`~pipelines.stage.ShardDecisions`: the
runner writes it by shard, and each shard's ``decide`` reads only its own part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.card import clusters_section
from curation.dedup.clusters import (
    KEEP_FIRST,
    KEEP_HIGHEST_CLIP_SCORE,
    KEEP_LONGEST_CAPTION,
    KEEP_POLICIES,
    Clusters,
    choose_survivors,
    connected_components,
)
from pipelines.stage import GlobalStage, Rejections, RunFiles, ShardDecisions
from schemas.columns import CAPTION, CLIP_SCORE, SOURCE_INDEX, UID

_SURVIVOR_UID, _CLUSTER_SIZE = "survivor_uid", "cluster_size"

#: Largest clusters listed in the manifest (and on the dataset card).
LARGEST_LISTED = 10


@dataclass
class DedupStage(GlobalStage):
    """Base of the dedup stages: ``keep`` says which row of a cluster survives (``first``: the
    earliest in the input; ``highest_clip_score``; ``longest_caption``; ties: the earliest).

    ``against`` names finished run directories whose kept rows (their final phase, read again
    with the same detector) join the search as rows that always survive: this pool's copies of
    what an earlier run published are rejected, with the earlier row's uid as ``duplicate_of``.
    """

    #: Reject reason of the rows that are not their cluster's survivor.
    reason: ClassVar[str] = "duplicate"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)
    decides_by_shard: ClassVar[bool] = True

    keep: str = KEEP_FIRST
    against: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.keep not in KEEP_POLICIES:
            raise ValueError(f"keep must be one of {KEEP_POLICIES}, got {self.keep!r}")

    def identity(self) -> dict[str, Any]:
        """An earlier run is part of the decision: which one, and in what state."""
        identity = {}
        for run in self.against:
            manifest = RunFiles(run).read_manifest()
            identity[run] = None if manifest is None else [manifest.config_hash, manifest.updated_at]
        return {"against": identity} if identity else {}

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """Columns the detector reads."""
        raise NotImplementedError

    @property
    def compute_columns(self) -> tuple[str, ...]:
        preference = {KEEP_FIRST: (), KEEP_HIGHEST_CLIP_SCORE: (CLIP_SCORE,), KEEP_LONGEST_CAPTION: (CAPTION,)}
        return tuple(dict.fromkeys((UID, SOURCE_INDEX, *preference[self.keep], *self.feature_columns)))

    def _preference(self, batch: pa.Table) -> np.ndarray | None:
        """What ``keep`` prefers of each row (larger survives), or None for ``first``. The rows of
        an earlier run may lack the column: they survive anyway, their preference is 0."""
        column = {KEEP_HIGHEST_CLIP_SCORE: CLIP_SCORE, KEEP_LONGEST_CAPTION: CAPTION}.get(self.keep)
        if column is None:
            return None
        if column not in batch.column_names:
            return np.zeros(batch.num_rows)
        if self.keep == KEEP_HIGHEST_CLIP_SCORE:
            return batch[CLIP_SCORE].to_numpy(zero_copy_only=False).astype(np.float64)
        return pc.utf8_length(pc.fill_null(batch[CAPTION], "")).to_numpy().astype(np.float64)

    def decide(self, batch: pa.Table, decided: pa.Table | None) -> pa.Table:
        """Reject the rows of ``batch`` that its shard's decided rows name."""
        rejections = Rejections(batch.num_rows)
        if decided is not None and decided.num_rows:
            decided = decided.sort_by(SOURCE_INDEX)
            found = decided[SOURCE_INDEX].to_numpy()
            index = batch[SOURCE_INDEX].to_numpy()
            at = np.minimum(np.searchsorted(found, index), len(found) - 1)
            hit = found[at] == index
            survivor, size = decided[_SURVIVOR_UID].to_pylist(), decided[_CLUSTER_SIZE].to_numpy()
            details = [
                json.dumps({"duplicate_of": survivor[a], "cluster_size": int(size[a]), "keep": self.keep})
                if h
                else None
                for a, h in zip(at.tolist(), hit.tolist())
            ]
            rejections.add(pa.array(hit), self.reason, pa.array(details, pa.string()))
        return rejections.attach(batch.select([]))

    def card_notes(self, view: Any) -> str | None:
        return clusters_section(view, self.keep)

    def describe(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "keep": self.keep,
            **{k: ({str(s): n for s, n in v.items()} if isinstance(v, dict) else v) for k, v in summary.items()},
        }


def cluster_facts(clusters: Clusters, pinned: np.ndarray, duplicate: np.ndarray, against: bool) -> dict[str, Any]:
    """What the manifest and the card tell of a dedup decision (of the whole pool, or of a part)."""
    facts = {
        "duplicate_rows": int(duplicate.sum()),
        "rows": int((~pinned).sum()),
        "clusters": int((clusters.sizes > 1).sum()),
        "largest": clusters.largest(LARGEST_LISTED),
        "size_histogram": clusters.size_histogram(),
    }
    if against:
        facts["earlier_rows"] = int(pinned.sum())
        facts["duplicates_of_earlier_runs"] = int((duplicate & pinned[clusters.survivor]).sum())
    return facts


def decided_rows(index: np.ndarray, uid: np.ndarray, clusters: Clusters, duplicate: np.ndarray) -> pa.Table:
    """One row per duplicate, by ``source_index``: the survivor's uid and the cluster's size."""
    order = np.argsort(index[duplicate])
    return pa.table(
        {
            SOURCE_INDEX: pa.array(index[duplicate][order], pa.int64()),
            _SURVIVOR_UID: pa.array(uid[clusters.survivor[duplicate]][order].tolist(), pa.string()),
            _CLUSTER_SIZE: pa.array(clusters.sizes[clusters.labels[duplicate]][order], pa.int64()),
        }
    )


@dataclass
class ClusterDedup(DedupStage):
    """A dedup stage whose detector finds duplicate pairs (edges) over the whole pool, gathered
    by ``aggregate``: the clusters are the connected components of the edges."""

    # What subclasses provide -------------------------------------------------------------
    def features(self, batch: pa.Table) -> dict[str, Any]:
        """The detector's per-shard features."""
        raise NotImplementedError

    def edges(self, features: list[dict[str, Any]], num_rows: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Duplicate pairs as row numbers in the concatenation of the shards' partials, in order,
        and facts about the search for the manifest."""
        raise NotImplementedError

    # The two passes ----------------------------------------------------------------------
    def compute(self, batch: pa.Table) -> dict[str, Any]:
        return {
            "uid": np.asarray(batch[UID].to_pylist(), dtype=object),
            "index": batch[SOURCE_INDEX].to_numpy().astype(np.int64),
            "preference": self._preference(batch),
            "features": self.features(batch),
        }

    def aggregate(self, partials: list[dict[str, Any]]) -> ShardDecisions:
        earlier = [part for run in self.against for part in self._earlier_run(run)]
        parts = list(partials) + earlier
        uid = np.concatenate([p["uid"] for p in parts] or [np.empty(0, dtype=object)])
        index = np.concatenate([p["index"] for p in parts] or [np.empty(0, dtype=np.int64)])
        pinned = np.concatenate([np.full(len(p["index"]), "pinned" in p) for p in parts] or [np.empty(0, bool)])
        preference = None if self.keep == KEEP_FIRST else np.concatenate([p["preference"] for p in parts])
        left, right, facts = self.edges([p["features"] for p in parts], len(index))
        clusters = choose_survivors(connected_components(len(index), left, right), index, preference, pinned)
        duplicate = clusters.duplicate & ~pinned
        summary = {**cluster_facts(clusters, pinned, duplicate, bool(self.against)), "edges": len(left), **facts}
        return ShardDecisions(decided_rows(index, uid, clusters, duplicate), summary)

    def _earlier_run(self, run: str) -> list[dict[str, Any]]:
        """The kept rows of a finished run as pinned partials: they always survive their cluster,
        so a row of this pool that duplicates one is rejected with that row's uid."""
        rundir = RunFiles(run)
        try:
            files = rundir.kept_files()
        except ValueError as error:
            raise ValueError(f"against: {error}") from None
        columns = [UID, *self.feature_columns]
        parts, seen = [], 0
        for path in files:
            table = rundir.read_table(path)
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise ValueError(
                    f"against: the kept rows of {run!r} have no {missing} column(s), which "
                    f"{type(self).__name__} compares (a stage of that run dropped them?)"
                )
            for batch in table.select(columns).to_batches(self.resources.batch_size):
                batch = pa.Table.from_batches([batch])
                # Negative positions: never confused with this pool's source_index.
                parts.append(
                    {
                        "uid": np.asarray(batch[UID].to_pylist(), dtype=object),
                        "index": -1 - np.arange(seen, seen + batch.num_rows, dtype=np.int64),
                        "preference": np.zeros(batch.num_rows),
                        "features": self.features(batch),
                        "pinned": True,
                    }
                )
                seen += batch.num_rows
        return parts
