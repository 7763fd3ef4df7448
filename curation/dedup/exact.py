"""Exact duplicates: rows whose key columns are equal (url and caption, image ``sha256``, ...).

Each row's keys are hashed twice with independent seeds (a false match needs a 128-bit
collision); rows with equal hash pairs are one cluster. The first hash is the key the runner
groups rows by, so a cluster is always decided whole, where its rows meet, and no process holds
the rows of the whole pool.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa

from curation.dedup.base import LARGEST_LISTED, DedupStage, cluster_facts, decided_rows
from curation.dedup.clusters import choose_survivors
from curation.dedup.minhash import normalise
from pipelines.stage import KEY, PINNED, Resources, default_resources
from schemas.columns import CAPTION, SOURCE_INDEX, UID, URL

DUPLICATE = "duplicate"
_SEEDS = (0x5EED_1D2E, 0xC0FFEE_4A5B)
_SECOND_HASH, _PREFERENCE = "h2", "preference"


@dataclass
class ExactDuplicates(DedupStage):
    """Rejects every row whose ``keys`` equal another row's; ``keep`` picks the survivor.

    ``normalize_text`` compares captions lower-cased, punctuation and runs of white space
    collapsed (other keys, such as URLs or ``sha256``, are compared as they are).
    """

    name: ClassVar[str] = "exact_duplicates"
    reason: ClassVar[str] = DUPLICATE

    keys: list[str] = field(default_factory=lambda: [URL, CAPTION])
    normalize_text: bool = False
    resources: Resources = default_resources(batch_size=65536)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.keys:
            raise ValueError("keys must name at least one column")

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.keys))

    def features(self, batch: pa.Table, model: Any = None) -> pa.Table:
        frame = pl.from_arrow(batch.select(list(self.feature_columns)))
        if isinstance(frame, pl.Series):
            frame = frame.to_frame()
        if self.normalize_text and CAPTION in frame.columns:
            frame = frame.with_columns(normalise(frame[CAPTION]).alias(CAPTION))
        preference = self._preference(batch)
        return pa.table(
            {
                KEY: frame.hash_rows(seed=_SEEDS[0]).to_arrow(),
                _SECOND_HASH: frame.hash_rows(seed=_SEEDS[1]).to_arrow(),
                UID: batch[UID],
                SOURCE_INDEX: batch[SOURCE_INDEX],
                _PREFERENCE: pa.nulls(batch.num_rows, pa.float64()) if preference is None else pa.array(preference),
            }
        )

    def reduce(self, group: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        first, second = group[KEY].to_numpy(), group[_SECOND_HASH].to_numpy()
        order = np.lexsort((second, first))
        starts = np.ones(group.num_rows, dtype=bool)
        starts[1:] = (first[order][1:] != first[order][:-1]) | (second[order][1:] != second[order][:-1])
        labels = np.empty(group.num_rows, dtype=np.int64)
        labels[order] = np.cumsum(starts) - 1
        index = group[SOURCE_INDEX].to_numpy()
        pinned = group[PINNED].to_numpy(zero_copy_only=False)
        preference = None if group[_PREFERENCE].null_count == group.num_rows else group[_PREFERENCE].to_numpy()
        clusters = choose_survivors(labels, index, preference, pinned)
        duplicate = clusters.duplicate & ~pinned
        uid = np.asarray(group[UID].to_pylist(), dtype=object)
        facts = cluster_facts(clusters, pinned, duplicate, bool(self.against))
        facts["edges"] = int(group.num_rows - starts.sum())
        facts["size_histogram"] = {str(size): n for size, n in facts["size_histogram"].items()}  # JSON's keys
        return decided_rows(index, uid, clusters, duplicate), facts

    def summarise(self, facts: list[dict[str, Any]]) -> dict[str, Any]:
        parts = [f for f in facts if f]  # a partition without rows has no facts
        counted = ["duplicate_rows", "rows", "clusters", "edges"]
        if self.against:
            counted += ["earlier_rows", "duplicates_of_earlier_runs"]
        summed = {k: sum(part[k] for part in parts) for k in counted}
        histogram: Counter[int] = Counter()
        for part in parts:
            histogram.update({int(size): n for size, n in part["size_histogram"].items()})
        largest = sorted((size for part in parts for size in part["largest"]), reverse=True)[:LARGEST_LISTED]
        return {
            **summed,
            "largest": largest,
            "size_histogram": dict(sorted(histogram.items())),
            "keys": list(self.keys),
        }
