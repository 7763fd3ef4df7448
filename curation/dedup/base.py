"""What every dedup stage shares: the survivor policy, the decision, and its summary.

A dedup stage is a keyed whole-pool step (:class:`~pipelines.stage.KeyedStage`): its features
(hashes, MinHash bands, embeddings by k-means cell) carry each row's uid, ``source_index`` and
survivor preference to where its key's rows meet; clusters get one survivor each, and ``decide``
rejects every other row with the survivor's uid in the detail. The decision is one row per
duplicate (its ``source_index``, the survivor's uid, the cluster's size), written by shard, so
each shard's ``decide`` reads only its own part.
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
)
from pipelines.stage import KeyedStage, Rejections, RunFiles
from schemas.columns import CAPTION, CLIP_SCORE, SOURCE_INDEX, UID

_SURVIVOR_UID, _CLUSTER_SIZE = "survivor_uid", "cluster_size"

#: Largest clusters listed in the manifest (and on the dataset card).
LARGEST_LISTED = 10


@dataclass
class DedupStage(KeyedStage):
    """Base of the dedup stages: ``keep`` says which row of a cluster survives (``first``: the
    earliest in the input; ``highest_clip_score``; ``longest_caption``; ties: the earliest).

    ``against`` names finished run directories whose kept rows (their final phase, read again
    with the same detector) join the search as rows that always survive: this pool's copies of
    what an earlier run published are rejected, with the earlier row's uid as ``duplicate_of``.
    """

    #: Reject reason of the rows that are not their cluster's survivor.
    reason: ClassVar[str] = "duplicate"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)

    keep: str = KEEP_FIRST
    against: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.keep not in KEEP_POLICIES:
            raise ValueError(f"keep must be one of {KEEP_POLICIES}, got {self.keep!r}")

    def pinned_runs(self) -> list[str]:
        return list(self.against)

    @property
    def pinned_columns(self) -> tuple[str, ...]:
        """The columns read from the kept rows of the ``against`` runs (no survivor preference:
        those rows survive anyway)."""
        return (UID, SOURCE_INDEX, *self.feature_columns)

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
