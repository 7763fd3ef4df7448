"""A stand-in for CLIP in the scale benchmark: embeddings and scores computed from the row alone.

``SyntheticClip`` writes ``image_embedding``, ``text_embedding`` (``dim`` wide, unit, float16) and
``clip_score`` without a model, vectorised over the batch, so that ``benchmarks/scale.py`` can
run the CLIP-score cuts and image near-duplicates over 10M rows on a CPU. A row's image is a
random Fourier feature of the image id in its url (``.../<id>.jpg``): rows of the same id have
the same image, and a url with ``?copy=<k>`` is that image slightly changed (cosine ~0.97).
Its text is the image's direction mixed with noise (cosine ~0.3, as matched CLIP pairs score),
or, for one row in five, an unrelated direction (a mismatched pair, cosine ~0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.stage import Stage
from schemas.columns import CLIP_SCORE, IMAGE_EMBEDDING, SOURCE_INDEX, TEXT_EMBEDDING, URL
from schemas.embeddings import float16_lists

MISMATCHED_EVERY = 5


@dataclass
class SyntheticClip(Stage):
    """Deterministic embeddings and scores from the url and the row's position (see the module)."""

    name: ClassVar[str] = "synthetic_clip"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, URL)
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE_EMBEDDING, TEXT_EMBEDDING, CLIP_SCORE)
    dim: int = 32

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = pc.extract_regex(batch[URL], r"/(?P<id>\d+)\.jpg(?:\?copy=(?P<copy>\d+))?")
        ids = pc.cast(pc.struct_field(parts, "id"), pa.float64()).to_numpy(zero_copy_only=False)
        copy = pc.fill_null(pc.not_equal(pc.struct_field(parts, "copy"), ""), False).to_numpy(zero_copy_only=False)
        index = batch[SOURCE_INDEX].to_numpy().astype(np.float64)
        image = self._features(ids, 0)
        image[copy] = _unit(image[copy] + 0.25 * self._features(index[copy], 1))
        mismatched = batch[SOURCE_INDEX].to_numpy() % MISMATCHED_EVERY == 0
        text = _unit(0.3 * image + 0.95 * self._features(index, 2))
        text[mismatched] = self._features(index[mismatched], 3)
        scores = np.einsum("ij,ij->i", image, text)
        return pa.table(
            {
                IMAGE_EMBEDDING: float16_lists(image),
                TEXT_EMBEDDING: float16_lists(text),
                CLIP_SCORE: pa.array(scores.astype(np.float32)),
            }
        )

    def _features(self, values: np.ndarray, stream: int) -> np.ndarray:
        """Unit random Fourier features of ``values``: nearly orthogonal for any two values."""
        rng = np.random.default_rng(stream)
        frequencies, phases = rng.normal(0, 50, self.dim), rng.uniform(0, 2 * np.pi, self.dim)
        return _unit(np.cos(np.outer(values, frequencies) + phases))


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
