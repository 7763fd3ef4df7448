"""Near-duplicate captions: MinHash LSH candidates, verified by exact Jaccard, clustered.

``features`` shingles the captions, computes datasketch-identical MinHash signatures and emits
one row per (caption, LSH band): the band's key, the caption's shingle hashes (about 4 bytes a
shingle) and what the survivor policy needs. The runner brings each key's rows together (a hash
shuffle under Ray); ``reduce`` pairs the rows that share a key, keeps the pairs whose exact
Jaccard similarity of shingle sets reaches ``threshold`` and returns them as edges; one task
clusters the edges of the whole pool. Captions with no shingle (empty after normalisation) are
never paired. A pool's shuffle carries ``bands`` copies of each caption's shingles (16 at the
default threshold: about 1.3 KB a row for a 12-word caption), spilled to disk by Ray Data where
they do not fit its object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.linked import PREFERENCE, LinkedDedup, edge_rows
from curation.dedup.minhash import (
    SHINGLE_KINDS,
    MinHasher,
    Shingles,
    band_keys,
    candidate_pairs,
    caption_series,
    jaccard,
    lsh_params,
    mix64,
    shingle,
)
from pipelines.stage import KEY, PINNED, Resources, default_resources
from schemas.columns import CAPTION, SOURCE_INDEX, UID

NEAR_DUPLICATE_CAPTION = "near_duplicate_caption"
_BAND, _SHINGLES = "band", "shingles"
#: The band of the one feature row of a caption without shingles (counted, never paired).
_NO_SHINGLES = -1


@dataclass
class CaptionNearDuplicates(LinkedDedup):
    """Rejects rows whose caption is a near-duplicate (Jaccard >= ``threshold`` over word or
    character ``shingle_size``-grams) of a surviving row's caption.

    ``num_perm`` and ``seed`` define the MinHash permutations (datasketch's); ``bands`` and
    ``rows_per_band`` default to the split that minimises the weighted areas of false negatives
    and false positives under the LSH S-curve at ``threshold``. Every candidate pair is checked
    by exact Jaccard, so a false positive costs only that check: misses weigh
    ``false_negative_weight`` (0.95: 16 bands of 8 at 128 permutations and threshold 0.8, a
    pair at exactly 0.8 becomes a candidate with probability 0.95; datasketch's default 0.5
    gives 9 of 13 and 0.40). Buckets larger than ``max_bucket`` pair every member with one row.
    """

    name: ClassVar[str] = "caption_near_duplicates"
    reason: ClassVar[str] = NEAR_DUPLICATE_CAPTION

    threshold: float = 0.8
    shingle_kind: str = "word"
    shingle_size: int = 1
    num_perm: int = 128
    seed: int = 1
    false_negative_weight: float = 0.95
    bands: int | None = None
    rows_per_band: int | None = None
    max_bucket: int = 64
    resources: Resources = default_resources(batch_size=65536)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shingle_kind not in SHINGLE_KINDS:
            raise ValueError(f"shingle_kind must be one of {SHINGLE_KINDS}, got {self.shingle_kind!r}")
        if self.shingle_size < 1:
            raise ValueError(f"shingle_size must be >= 1, got {self.shingle_size}")
        if (self.bands is None) != (self.rows_per_band is None):
            raise ValueError("set both bands and rows_per_band, or neither")
        if self.bands is None:
            self.bands, self.rows_per_band = lsh_params(
                self.threshold, self.num_perm, 1 - self.false_negative_weight, self.false_negative_weight
            )
        elif self.bands * self.rows_per_band > self.num_perm:
            raise ValueError(
                f"bands x rows_per_band = {self.bands * self.rows_per_band} exceeds num_perm {self.num_perm}"
            )
        if self.max_bucket < 2:
            raise ValueError(f"max_bucket must be >= 2, got {self.max_bucket}")

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return (CAPTION,)

    def features(self, batch: pa.Table, model: Any = None) -> pa.Table:
        shingles = shingle(caption_series(batch[CAPTION]), self.shingle_kind, self.shingle_size)
        keys = band_keys(MinHasher(self.num_perm, self.seed).signatures(shingles), self.bands, self.rows_per_band)
        has = shingles.counts > 0
        # Each caption with shingles once per band; one without, once, under a key of its own.
        rows = np.concatenate([np.repeat(np.flatnonzero(has), self.bands), np.flatnonzero(~has)])
        index = batch[SOURCE_INDEX].to_numpy().astype(np.int64)
        key = np.concatenate([keys[has].ravel(), mix64(index[~has].astype(np.uint64))])
        band = np.concatenate([np.tile(np.arange(self.bands), int(has.sum())), np.full((~has).sum(), _NO_SHINGLES)])
        hashes = pa.ListArray.from_arrays(pa.array(shingles.offsets, pa.int32()), pa.array(shingles.hashes))
        taken = pa.array(rows, pa.int64())
        return pa.table(
            {
                KEY: pa.array(key.view(np.int64)),
                _BAND: pa.array(band, pa.int16()),
                SOURCE_INDEX: pa.array(index[rows], pa.int64()),
                UID: batch[UID].take(taken),
                PREFERENCE: self.preference_column(batch).take(taken),
                _SHINGLES: hashes.take(taken),
            }
        )

    def reduce(self, group: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        # By key, then input order: a bucket too large to pair in full pairs its earliest row.
        group = group.take(pc.sort_indices(group, [(KEY, "ascending"), (SOURCE_INDEX, "ascending")]))
        band = group[_BAND].to_numpy()
        counted = band <= 0  # each caption once: band 0, or its only row
        pinned = group[PINNED].to_numpy(zero_copy_only=False)
        eligible = band != _NO_SHINGLES
        left, right, capped = candidate_pairs(group[KEY].to_numpy()[:, None], eligible, self.max_bucket)
        lists = group[_SHINGLES].combine_chunks()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        shingles = Shingles(offsets - offsets[0], lists.values.to_numpy()[offsets[0] : offsets[-1]])
        match = jaccard(shingles, left, right) >= self.threshold
        facts = {
            "rows": int((counted & ~pinned).sum()),
            "earlier_rows": int((counted & pinned).sum()),
            "rows_without_shingles": int(((band == _NO_SHINGLES) & ~pinned).sum()),
            "candidate_pairs": len(left),
            "verified_pairs": int(match.sum()),
            "capped_buckets": capped,
        }
        return edge_rows(group, left[match], right[match]), facts

    @property
    def summed_facts(self) -> tuple[str, ...]:
        return ("rows_without_shingles", "candidate_pairs", "verified_pairs", "capped_buckets")

    def summarise(self, facts: list[dict[str, Any]]) -> dict[str, Any]:
        return {**super().summarise(facts), "bands": self.bands, "rows_per_band": self.rows_per_band}
