"""Near-duplicate captions: MinHash LSH candidates, verified by exact Jaccard, clustered.

``compute`` shingles each shard's captions, computes datasketch-identical MinHash signatures
and keeps their LSH band keys and the shingle hashes (about 4 bytes a shingle, so a 12-word
caption costs ~50 bytes plus 8 per band on the driver). ``aggregate`` pairs rows that share a
band key, keeps the pairs whose exact Jaccard similarity of shingle sets reaches ``threshold``,
and clusters them. Captions with no shingle (empty after normalisation) are never paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation.dedup.base import ClusterDedup
from curation.dedup.minhash import (
    SHINGLE_KINDS,
    MinHasher,
    Shingles,
    band_keys,
    candidate_pairs,
    caption_series,
    jaccard,
    lsh_params,
    shingle,
)
from pipelines.stage import Resources, default_resources
from schemas.columns import CAPTION

NEAR_DUPLICATE_CAPTION = "near_duplicate_caption"


@dataclass
class CaptionNearDuplicates(ClusterDedup):
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

    def features(self, batch: pa.Table) -> dict[str, Any]:
        shingles = shingle(caption_series(batch[CAPTION]), self.shingle_kind, self.shingle_size)
        signatures = MinHasher(self.num_perm, self.seed).signatures(shingles)
        return {"keys": band_keys(signatures, self.bands, self.rows_per_band), "shingles": shingles}

    def edges(self, features: list[dict[str, Any]], num_rows: int):
        keys = np.concatenate([f["keys"] for f in features] or [np.zeros((0, self.bands), np.uint64)])
        shingles = concat_shingles([f["shingles"] for f in features])
        left, right, capped = candidate_pairs(keys, shingles.counts > 0, self.max_bucket)
        similarity = jaccard(shingles, left, right)
        match = similarity >= self.threshold
        return (
            left[match],
            right[match],
            {
                "candidate_pairs": len(left),
                "verified_pairs": int(match.sum()),
                "capped_buckets": capped,
                "bands": self.bands,
                "rows_per_band": self.rows_per_band,
                "rows_without_shingles": int((shingles.counts == 0).sum()),
            },
        )


def concat_shingles(parts: list[Shingles]) -> Shingles:
    """The shingles of several batches, rows in order."""
    if not parts:
        return Shingles(np.zeros(1, np.int64), np.zeros(0, np.uint32))
    offsets = [parts[0].offsets]
    for part in parts[1:]:
        offsets.append(part.offsets[1:] + offsets[-1][-1])
    return Shingles(np.concatenate(offsets), np.concatenate([p.hashes for p in parts]))
