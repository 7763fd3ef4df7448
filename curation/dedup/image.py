"""Near-duplicate images (and image-text pairs) from the CLIP image embeddings, with faiss.

The embeddings are the float16 ``image_embedding`` column that ``ClipEmbed`` wrote; no image is
decoded again. ``compute`` checks and collects them per shard (2 bytes a dimension a row on the
driver: 1 KiB a row at 512-d); ``aggregate`` searches every row's nearest neighbours (see
:mod:`curation.dedup.vectors`) and links pairs at cosine >= ``threshold``. With
``caption_threshold`` set, a pair is a duplicate only if its captions are near-duplicates too
(exact Jaccard of their shingle sets), so the same photo under two different, informative
captions keeps both: the pair-level policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation.dedup.base import ClusterDedup
from curation.dedup.minhash import SHINGLE_KINDS, caption_series, concat_shingles, jaccard, shingle
from curation.dedup.vectors import SearchSettings, similar_pairs, unit_rows
from pipelines.stage import Resources, default_resources
from schemas.columns import CAPTION, IMAGE_EMBEDDING
from schemas.embeddings import embedding_matrix

NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
NEAR_DUPLICATE_PAIR = "near_duplicate_pair"


@dataclass
class ImageNearDuplicates(ClusterDedup):
    """Rejects rows whose image embedding has cosine >= ``threshold`` with a surviving row's
    (and, with ``caption_threshold``, whose caption is also that near its caption).

    The default ``threshold`` is calibrated on real photos for the project's LiT CLIP
    (``benchmarks/dedup_images_real.py``: precision 1.000, recall 0.867 over JPEG q15, half
    size, 5% crop, mirror and watermark copies; 0.80 gives 0.998 and 0.993). Cosines depend on
    the model: recalibrate with that script for another one.

    ``dim`` pins the embedding width (the CLIP model's); left unset, the first shard's width
    is required of every row. ``index``, ``exact_max_rows``, ``neighbours``, ``nprobe`` and
    ``nlist`` set the faiss search (:class:`curation.dedup.vectors.SearchSettings`).
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
    nprobe: int = 16
    nlist: int | None = None
    resources: Resources = default_resources(batch_size=65536)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine in [-1, 1], got {self.threshold}")
        if self.caption_threshold is not None and not 0.0 < self.caption_threshold <= 1.0:
            raise ValueError(f"caption_threshold is a Jaccard similarity in (0, 1], got {self.caption_threshold}")
        if self.shingle_kind not in SHINGLE_KINDS:
            raise ValueError(f"shingle_kind must be one of {SHINGLE_KINDS}, got {self.shingle_kind!r}")
        self.search = SearchSettings(self.index, self.exact_max_rows, self.neighbours, self.nprobe, self.nlist)

    @property
    def reason(self) -> str:  # type: ignore[override]
        return NEAR_DUPLICATE_IMAGE if self.caption_threshold is None else NEAR_DUPLICATE_PAIR

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return (IMAGE_EMBEDDING,) if self.caption_threshold is None else (IMAGE_EMBEDDING, CAPTION)

    def features(self, batch: pa.Table) -> dict[str, Any]:
        features = {"embeddings": embedding_matrix(batch, self.dim)}
        if self.caption_threshold is not None:
            features["shingles"] = shingle(caption_series(batch[CAPTION]), self.shingle_kind, self.shingle_size)
        return features

    def edges(self, features: list[dict[str, Any]], num_rows: int):
        widths = {f["embeddings"].shape[1] for f in features if len(f["embeddings"])}
        if len(widths) > 1:
            raise ValueError(
                f"image embeddings of different widths {sorted(widths)} across shards: were they "
                f"written by different CLIP models? Set dim to the model's width to find the odd ones"
            )
        vectors = unit_rows(
            np.concatenate(
                [f["embeddings"] for f in features if len(f["embeddings"])]
                or [np.zeros((0, self.dim or 1), np.float16)]
            )
        )
        left, right, facts = similar_pairs(vectors, self.threshold, self.search)
        facts = {**facts, "image_pairs": len(left)}
        if self.caption_threshold is not None:
            match = jaccard(concat_shingles([f["shingles"] for f in features]), left, right) >= self.caption_threshold
            left, right = left[match], right[match]
            facts["pairs_with_near_duplicate_captions"] = len(left)
        return left, right, facts
