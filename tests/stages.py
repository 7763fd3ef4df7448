"""Stages used only by tests; importable by Ray workers as ``tests.stages``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.stage import Rejections, Stage
from schemas.columns import (
    CAPTION,
    CLIP_SCORE,
    IMAGE,
    IMAGE_EMBEDDING,
    SOURCE_INDEX,
    TEXT_EMBEDDING,
    register_column,
)
from schemas.rejects import INTERNAL_ERROR

SETUP_CALLS = register_column("test_setup_calls", pa.int32(), "tests: times setup ran in this worker").name
CAPTION_WORDS = register_column("test_caption_words", pa.int32(), "tests: words in the caption").name


@dataclass
class CountSetup(Stage):
    """Writes how many times ``setup`` ran in this worker (must be 1) and counts words."""

    name: ClassVar[str] = "count_setup"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)
    output_columns: ClassVar[tuple[str, ...]] = (SETUP_CALLS, CAPTION_WORDS)

    def __post_init__(self) -> None:
        self._calls = 0

    def setup(self) -> None:
        self._calls += 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        words = pc.cast(pc.count_substring_regex(batch[CAPTION], r"\S+"), pa.int32())
        return pa.table({SETUP_CALLS: pa.repeat(pa.scalar(self._calls, pa.int32()), n), CAPTION_WORDS: words})


@dataclass
class Slow(Stage):
    """Sleeps ``seconds`` per batch and keeps every row; runs in actors (it has ``setup``)."""

    name: ClassVar[str] = "slow"
    seconds: float = 0.3

    def setup(self) -> None:
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(self.seconds)
        return batch.select([])


@dataclass
class FailOnIndex(Stage):
    """Raises on the batch holding input row ``source_index`` (a stage bug), keeps everything else."""

    name: ClassVar[str] = "fail_on_index"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)
    source_index: int = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.source_index in batch[SOURCE_INDEX].to_pylist():
            raise RuntimeError(f"boom on row {self.source_index} in pid {os.getpid()}")
        return batch.select([])


@dataclass
class InternalErrorOnIndex(Stage):
    """Rejects input row ``source_index`` with ``internal_error``, as a stage does whose own code
    failed on one row (a decoder bug)."""

    name: ClassVar[str] = "internal_error_on_index"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)
    source_index: int = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        rejections.add(pc.equal(batch[SOURCE_INDEX], self.source_index), INTERNAL_ERROR, "RuntimeError: a bug")
        return rejections.attach(batch.select([]))


@dataclass
class RejectOddWords(Stage):
    """Rejects captions with an odd number of words (a deterministic, content-based drop)."""

    name: ClassVar[str] = "reject_odd_words"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION_WORDS,)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        rejections.add(pc.equal(pc.bit_wise_and(batch[CAPTION_WORDS], 1), 1), "odd_words", "odd word count")
        return rejections.attach(batch.select([]))


@dataclass
class DieInCall(Stage):
    """Kills its own worker process on every batch (a crashing decoder, an OOM kill)."""

    name: ClassVar[str] = "die_in_call"

    def setup(self) -> None:
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        os._exit(1)


@dataclass
class DieOnce(Stage):
    """Kills its worker process on its first batch of the run (``marker`` records it); Ray's
    restarted actor then keeps every row."""

    name: ClassVar[str] = "die_once"
    marker: str

    def setup(self) -> None:
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return batch.select([])


@dataclass
class WorkerNoise(Stage):
    """Says things in its worker as libraries do (prints, a logger's warning, a Python warning);
    keeps every row."""

    name: ClassVar[str] = "worker_noise"

    def setup(self) -> None:
        import logging
        import sys
        import warnings

        print("noise from a worker on stdout")
        print("noise from a worker on stderr", file=sys.stderr)
        logging.getLogger("somelib").warning("noise from a worker's library logger")
        warnings.warn("noise from a worker's python warning", UserWarning, stacklevel=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.select([])


@dataclass
class MinWords(Stage):
    """A stage with a required parameter (no default)."""

    name: ClassVar[str] = "min_words_required"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION_WORDS,)
    minimum: int

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        rejections.add(pc.less(batch[CAPTION_WORDS], self.minimum), "few_words", f"< {self.minimum}")
        return rejections.attach(batch.select([]))


@dataclass
class PaintImages(Stage):
    """Writes ``image``: a deterministic PNG per row (noise seeded by its index); captions
    containing ``corrupt`` get truncated bytes, ``empty`` get none: download-free image rows."""

    name: ClassVar[str] = "paint_images"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, CAPTION)
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE,)
    size: int = 48

    def __call__(self, batch: pa.Table) -> pa.Table:
        import io

        import numpy as np
        from PIL import Image

        images = []
        for index, caption in zip(batch[SOURCE_INDEX].to_pylist(), batch[CAPTION].to_pylist()):
            pixels = np.random.default_rng(index).integers(0, 256, (self.size, self.size + index % 7, 3), np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            body = buffer.getvalue()
            if "corrupt" in caption:
                body = body[: len(body) // 2]
            elif "empty" in caption:
                body = b""
            images.append(body)
        return pa.table({IMAGE: pa.array(images, pa.binary())})


@dataclass
class EmbedByGroup(Stage):
    """Writes ``image_embedding`` and ``clip_score`` from the caption, standing in for CLIP in
    dedup tests: ``g<k>`` puts the row near axis ``k`` (rows of a group have cosine > 0.99,
    other groups ~0), ``score=<x>`` sets the score (default 0), ``wide`` writes one value too
    many, ``noembed`` writes none."""

    name: ClassVar[str] = "embed_by_group"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, CAPTION)
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE_EMBEDDING, CLIP_SCORE)
    dim: int = 8

    def __call__(self, batch: pa.Table) -> pa.Table:
        import re

        import numpy as np

        vectors, scores = [], []
        for index, caption in zip(batch[SOURCE_INDEX].to_pylist(), batch[CAPTION].to_pylist()):
            group = re.search(r"\bg(\d+)\b", caption)
            score = re.search(r"\bscore=([0-9.]+)", caption)
            scores.append(float(score.group(1)) if score else 0.0)
            if "noembed" in caption:
                vectors.append(None)
                continue
            vector = np.random.default_rng(index).normal(0, 0.01, self.dim + ("wide" in caption))
            vector[int(group.group(1)) if group else self.dim - 1] += 1.0
            vectors.append((vector / np.linalg.norm(vector)).astype(np.float16).tolist())
        return pa.table(
            {IMAGE_EMBEDDING: pa.array(vectors, pa.list_(pa.float16())), CLIP_SCORE: pa.array(scores, pa.float32())}
        )


@dataclass
class EmbedPairs(Stage):
    """Writes ``image_embedding``, ``text_embedding`` and ``clip_score`` for any text pool, standing
    in for CLIP: a row's image is a direction drawn from its caption (equal captions, equal
    images), its text that direction plus noise drawn from its ``source_index``, or, every
    ``mismatch_every``-th row, another caption's direction; the score is their cosine."""

    name: ClassVar[str] = "embed_pairs"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, CAPTION)
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE_EMBEDDING, TEXT_EMBEDDING, CLIP_SCORE)
    dim: int = 16
    mismatch_every: int = 4

    def __call__(self, batch: pa.Table) -> pa.Table:
        import zlib

        import numpy as np

        images, texts, scores = [], [], []
        for index, caption in zip(batch[SOURCE_INDEX].to_pylist(), batch[CAPTION].to_pylist()):
            image = np.random.default_rng(zlib.crc32(caption.encode())).normal(size=self.dim)
            image /= np.linalg.norm(image)
            noise = np.random.default_rng(index)
            if index % self.mismatch_every == 0:
                text = noise.normal(size=self.dim)
            else:
                text = image + noise.normal(0, 0.6 / np.sqrt(self.dim), self.dim)
            text /= np.linalg.norm(text)
            images.append(image.astype(np.float16).tolist())
            texts.append(text.astype(np.float16).tolist())
            scores.append(float(image @ text))
        vectors = pa.list_(pa.float16())
        return pa.table(
            {
                IMAGE_EMBEDDING: pa.array(images, vectors),
                TEXT_EMBEDDING: pa.array(texts, vectors),
                CLIP_SCORE: pa.array(scores, pa.float32()),
            }
        )


def planted_vectors(rows: int = 640, originals: int = 24, dim: int = 64):
    """``rows`` random unit directions (pairwise cosines near 0) of which ``originals`` get 1 to 3
    copies with a little noise (cosine > 0.99), shuffled: the vectors (float16) and, for each,
    the row it was planted from."""
    import numpy as np

    rng = np.random.default_rng(0)
    vectors = list(rng.normal(size=(rows, dim)))
    group = list(range(rows))
    for k, original in enumerate(rng.choice(rows, originals, replace=False)):
        for _ in range(1 + k % 3):
            vectors.append(vectors[original] + rng.normal(0, 0.05, dim))
            group.append(int(original))
    order = rng.permutation(len(vectors))
    matrix = np.stack([vectors[i] for i in order])
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float16), [group[i] for i in order]


@dataclass
class PlantedEmbeddings(Stage):
    """Writes ``image_embedding``: row ``source_index`` of :func:`planted_vectors`."""

    name: ClassVar[str] = "planted_embeddings"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE_EMBEDDING,)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from schemas.embeddings import float16_lists

        vectors, _ = planted_vectors()
        return pa.table({IMAGE_EMBEDDING: float16_lists(vectors[batch[SOURCE_INDEX].to_numpy()])})
