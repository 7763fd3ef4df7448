"""Exact duplicates over the whole pool, as a global two-pass stage.

``compute`` hashes the key columns of each shard (two independent 64-bit row hashes, so a
false match needs a 128-bit collision); ``aggregate`` groups equal hashes across all shards and
keeps the row that came first in the input; ``decide`` rejects the others with reason
``duplicate`` and the survivor's uid in the detail. The decision is stored by ``source_index``
(unique by construction, unlike uids a user supplies), so a resumed run decides identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.stage import GlobalStage, Rejections, Resources, default_resources
from schemas.columns import CAPTION, SOURCE_INDEX, UID, URL

DUPLICATE = "duplicate"
_SEEDS = (0x5EED_1D2E, 0xC0FFEE_4A5B)


@dataclass
class ExactDuplicates(GlobalStage):
    """Rejects every row whose ``keys`` equal those of an earlier row (by ``source_index``).

    ``normalize_text`` compares the caption lower-cased, trimmed, with runs of whitespace
    collapsed (other keys, such as URLs, are compared as they are).
    """

    name: ClassVar[str] = "exact_duplicates"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)

    keys: list[str] = field(default_factory=lambda: [URL, CAPTION])
    normalize_text: bool = False
    resources: Resources = default_resources(batch_size=65536)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("keys must name at least one column")

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return (UID, SOURCE_INDEX, *dict.fromkeys(self.keys))

    def compute(self, batch: pa.Table) -> dict[str, np.ndarray]:
        frame = pl.from_arrow(batch.select(list(dict.fromkeys(self.keys))))
        if self.normalize_text and CAPTION in frame.columns:
            frame = frame.with_columns(
                pl.col(CAPTION).str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
            )
        return {
            "h1": frame.hash_rows(seed=_SEEDS[0]).to_numpy(),
            "h2": frame.hash_rows(seed=_SEEDS[1]).to_numpy(),
            "index": batch[SOURCE_INDEX].to_numpy(),
            "uid": np.asarray(batch[UID].to_pylist(), dtype=object),
        }

    def aggregate(self, partials: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        h1, h2, index, uid = (np.concatenate([p[k] for p in partials] or [np.empty(0)])
                              for k in ("h1", "h2", "index", "uid"))
        if len(index) == 0:
            return {"duplicate_of": {}, "groups": 0, "largest": 0}
        order = np.lexsort((index, h2, h1))
        h1, h2, index, uid = h1[order], h2[order], index[order], uid[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])
        group = np.cumsum(starts) - 1
        first_uid = uid[np.flatnonzero(starts)][group]
        duplicate = ~starts
        sizes = np.bincount(group)
        return {
            "duplicate_of": dict(zip(index[duplicate].tolist(), first_uid[duplicate].tolist())),
            "groups": int((sizes > 1).sum()),
            "largest": int(sizes.max()),
        }

    def decide(self, batch: pa.Table, state: dict[str, Any]) -> pa.Table:
        duplicate_of = state["duplicate_of"]
        rejections = Rejections(batch.num_rows)
        if duplicate_of:
            survivors = [duplicate_of.get(i) for i in batch[SOURCE_INDEX].to_pylist()]
            mask = pa.array([s is not None for s in survivors])
            details = pa.array([None if s is None else json.dumps({"duplicate_of": s}) for s in survivors],
                               pa.string())
            rejections.add(mask, DUPLICATE, details)
        return rejections.attach(batch.select([]))

    def describe(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"duplicate_rows": len(state["duplicate_of"]), "duplicate_groups": state["groups"],
                "largest_group": state["largest"], "keys": self.keys}
