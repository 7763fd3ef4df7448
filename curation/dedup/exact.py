"""Exact duplicates: rows whose key columns are equal (url and caption, image ``sha256``, ...).

Each shard's keys are hashed twice with independent seeds (a false match needs a 128-bit
collision); rows with equal hash pairs are one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa

from curation.dedup.base import ClusterDedup
from curation.dedup.minhash import normalise
from pipelines.stage import Resources, default_resources
from schemas.columns import CAPTION, URL

DUPLICATE = "duplicate"
_SEEDS = (0x5EED_1D2E, 0xC0FFEE_4A5B)


@dataclass
class ExactDuplicates(ClusterDedup):
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

    def features(self, batch: pa.Table) -> dict[str, np.ndarray]:
        frame = pl.from_arrow(batch.select(list(self.feature_columns)))
        if isinstance(frame, pl.Series):
            frame = frame.to_frame()
        if self.normalize_text and CAPTION in frame.columns:
            frame = frame.with_columns(normalise(frame[CAPTION]).alias(CAPTION))
        return {"h1": frame.hash_rows(seed=_SEEDS[0]).to_numpy(), "h2": frame.hash_rows(seed=_SEEDS[1]).to_numpy()}

    def edges(self, features: list[dict[str, Any]], num_rows: int):
        h1 = np.concatenate([f["h1"] for f in features] or [np.empty(0, np.uint64)])
        h2 = np.concatenate([f["h2"] for f in features] or [np.empty(0, np.uint64)])
        order = np.lexsort((h2, h1))
        starts = np.ones(num_rows, dtype=bool)
        starts[1:] = (h1[order][1:] != h1[order][:-1]) | (h2[order][1:] != h2[order][:-1])
        group_first = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
        duplicate = ~starts
        return group_first[duplicate], order[duplicate], {"keys": list(self.keys)}
