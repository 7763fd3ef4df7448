"""Near-duplicate images (and image-text pairs) from the CLIP image embeddings, SemDeDup-style.

The embeddings are the float16 ``image_embedding`` column that ``ClipEmbed`` wrote; no image is
decoded again. A small pool (up to ``exact_max_rows``) is one cell: every row is compared with
every other. A larger one is cut into cells first, as SemDeDup does: spherical k-means centroids
(about ``rows_per_cell`` rows each) are trained with faiss on a sample of the pool in one task,
and every row goes to its ``cells_per_row`` nearest cells (a near-duplicate pair on the border of
two cells still meets in one of them). The runner brings each cell's rows together (a hash
shuffle under Ray); ``reduce`` searches each cell exactly and links every row to those of its
``neighbours`` nearest at cosine >= ``threshold``; only these edges meet in one task, where the
clusters and survivors are decided. With ``caption_threshold`` set, a pair is a duplicate only
if its captions are near-duplicates too (exact Jaccard of their shingle sets), so the same
photo under two different, informative captions keeps both: the pair-level policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.linked import PREFERENCE, LinkedDedup, edge_rows
from curation.dedup.minhash import SHINGLE_KINDS, Shingles, caption_series, jaccard, shingle
from curation.dedup.vectors import kmeans_cells, nearest_cells, similar_pairs, unit_rows
from pipelines.stage import KEY, PINNED, Resources, default_resources
from schemas.columns import CAPTION, IMAGE_EMBEDDING, SOURCE_INDEX, UID
from schemas.embeddings import embedding_matrix, float16_lists

NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
NEAR_DUPLICATE_PAIR = "near_duplicate_pair"
INDEX_KINDS = ("auto", "exact", "cells")
#: Sample rows per k-means centroid (faiss asks for at least 39).
SAMPLE_PER_CELL = 64
_RANK, _SHINGLES = "rank", "shingles"


@dataclass
class ImageNearDuplicates(LinkedDedup):
    """Rejects rows whose image embedding has cosine >= ``threshold`` with a surviving row's
    (and, with ``caption_threshold``, whose caption is also that near its caption).

    The default ``threshold`` is calibrated on real photos for the project's LiT CLIP
    (``benchmarks/dedup_images_real.py``: precision 1.000, recall 0.867 over JPEG q15, half
    size, 5% crop, mirror and watermark copies; 0.80 gives 0.998 and 0.993). Cosines depend on
    the model: recalibrate with that script for another one.

    ``dim`` pins the embedding width (the CLIP model's); left unset, every row must have the
    width of the first one each step reads. ``index``: ``exact`` searches the pool as one cell,
    ``cells`` always cuts it into k-means cells, ``auto`` cuts it above ``exact_max_rows``.
    ``rows_per_cell``, ``cells_per_row``, ``max_sample_rows`` and ``seed`` shape the cells.
    """

    name: ClassVar[str] = "image_near_duplicates"

    threshold: float = 0.85
    caption_threshold: float | None = None
    shingle_kind: str = "word"
    shingle_size: int = 1
    dim: int | None = None
    index: str = "auto"
    exact_max_rows: int = 50_000
    neighbours: int = 16
    rows_per_cell: int = 2_000
    cells_per_row: int = 2
    max_sample_rows: int = 262_144
    seed: int = 0
    resources: Resources = default_resources(batch_size=65536)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine in [-1, 1], got {self.threshold}")
        if self.caption_threshold is not None and not 0.0 < self.caption_threshold <= 1.0:
            raise ValueError(f"caption_threshold is a Jaccard similarity in (0, 1], got {self.caption_threshold}")
        if self.shingle_kind not in SHINGLE_KINDS:
            raise ValueError(f"shingle_kind must be one of {SHINGLE_KINDS}, got {self.shingle_kind!r}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.neighbours < 2:
            raise ValueError(f"neighbours must be >= 2 (a row finds itself first), got {self.neighbours}")
        for key in ("rows_per_cell", "cells_per_row", "max_sample_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @property
    def reason(self) -> str:  # type: ignore[override]
        return NEAR_DUPLICATE_IMAGE if self.caption_threshold is None else NEAR_DUPLICATE_PAIR

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return (IMAGE_EMBEDDING,) if self.caption_threshold is None else (IMAGE_EMBEDDING, CAPTION)

    # Cells --------------------------------------------------------------------------------
    def cells(self, rows: int) -> int:
        """How many k-means cells a pool of ``rows`` is cut into (1: searched whole)."""
        if self.index == "exact" or (self.index == "auto" and rows <= self.exact_max_rows):
            return 1
        return max(1, math.ceil(rows / self.rows_per_cell))

    def sample_size(self, rows: int) -> int:
        cells = self.cells(rows)
        return 0 if cells == 1 else min(rows, self.max_sample_rows, SAMPLE_PER_CELL * cells)

    def fit(self, sample: pa.Table, rows: int) -> np.ndarray:
        """The cells' centroids, trained on the sample (fewer cells when the sample is small)."""
        vectors = unit_rows(embedding_matrix(sample, self.dim))
        cells = min(self.cells(rows), max(1, len(vectors) // SAMPLE_PER_CELL))
        return kmeans_cells(vectors, cells, self.seed)

    # The reduction ------------------------------------------------------------------------
    def features(self, batch: pa.Table, model: np.ndarray | None = None) -> pa.Table:
        """Each row once per cell it is searched in (``rank`` 0: its nearest), with its embedding."""
        if model is not None and self.dim is None:
            _same_width(batch, model.shape[1])
        embeddings = embedding_matrix(batch, self.dim)
        if model is None:
            cells = np.zeros((batch.num_rows, 1), np.int64)
        else:
            cells = nearest_cells(unit_rows(embeddings), model, self.cells_per_row)
        per_row = cells.shape[1]
        rows = pa.array(np.repeat(np.arange(batch.num_rows), per_row), pa.int64())
        columns = {
            KEY: pa.array(cells.ravel(), pa.int64()),
            _RANK: pa.array(np.tile(np.arange(per_row), batch.num_rows), pa.int16()),
            SOURCE_INDEX: batch[SOURCE_INDEX].take(rows),
            UID: batch[UID].take(rows),
            PREFERENCE: self.preference_column(batch).take(rows),
            IMAGE_EMBEDDING: float16_lists(embeddings).take(rows),
        }
        if self.caption_threshold is not None:
            shingles = shingle(caption_series(batch[CAPTION]), self.shingle_kind, self.shingle_size)
            lists = pa.ListArray.from_arrays(pa.array(shingles.offsets, pa.int32()), pa.array(shingles.hashes))
            columns[_SHINGLES] = lists.take(rows)
        return pa.table(columns)

    def reduce(self, group: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        group = group.take(pc.sort_indices(group, [(KEY, "ascending"), (SOURCE_INDEX, "ascending")]))
        keys = group[KEY].to_numpy()
        if self.dim is None:
            _same_width(group)
        vectors = unit_rows(embedding_matrix(group, self.dim))
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        lefts, rights = [], []
        for start, end in zip(starts.tolist(), ends.tolist()):
            left, right = similar_pairs(vectors[start:end], self.threshold, self.neighbours)
            lefts.append(left + start)
            rights.append(right + start)
        left, right = np.concatenate(lefts), np.concatenate(rights)
        counted = group[_RANK].to_numpy() == 0
        pinned = group[PINNED].to_numpy(zero_copy_only=False)
        facts = {
            "rows": int((counted & ~pinned).sum()),
            "earlier_rows": int((counted & pinned).sum()),
            "cells": len(starts),
            "largest_cell": int((ends - starts).max()),
            "image_pairs": len(left),
        }
        if self.caption_threshold is not None:
            lists = group[_SHINGLES].combine_chunks()
            offsets = lists.offsets.to_numpy().astype(np.int64)
            shingles = Shingles(offsets - offsets[0], lists.values.to_numpy()[offsets[0] : offsets[-1]])
            match = jaccard(shingles, left, right) >= self.caption_threshold
            left, right = left[match], right[match]
            facts["pairs_with_near_duplicate_captions"] = len(left)
        return edge_rows(group, left, right), facts

    @property
    def summed_facts(self) -> tuple[str, ...]:
        facts = ("cells", "image_pairs")
        return facts if self.caption_threshold is None else (*facts, "pairs_with_near_duplicate_captions")

    def summarise(self, facts: list[dict[str, Any]]) -> dict[str, Any]:
        summary = super().summarise(facts)
        largest = max((part.get("largest_cell", 0) for part in facts[:-1] if part), default=0)
        return {**summary, "search": "exact" if summary["cells"] <= 1 else "cells", "largest_cell": largest}


def _same_width(table: pa.Table, expected: int | None = None) -> None:
    """Every embedding of ``table`` (and the centroids', when given) has the same width, or a
    clear error: rows embedded by different CLIP models must not be compared."""
    lengths = pc.list_value_length(table[IMAGE_EMBEDDING]).to_numpy(zero_copy_only=False)
    widths = set(np.unique(lengths[~np.isnan(lengths.astype(float))]).astype(int).tolist())
    if expected is not None:
        widths.add(expected)
    if len(widths) > 1:
        raise ValueError(
            f"image embeddings of different widths {sorted(widths)} across shards: were they written by "
            "different CLIP models? Set dim to the model's width to find the odd ones"
        )
