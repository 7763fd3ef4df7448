"""Tests of schemas/embeddings.py: float16 embedding columns written and read back, bad rows named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from schemas.columns import IMAGE_EMBEDDING, TEXT_EMBEDDING, UID
from schemas.embeddings import embedding_matrix, float16_lists


def _table(matrix: np.ndarray, column: str = IMAGE_EMBEDDING) -> pa.Table:
    return pa.table({UID: [f"u{i}" for i in range(len(matrix))], column: float16_lists(matrix)})


def test_a_matrix_survives_the_round_trip_at_float16_precision():
    matrix = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    back = embedding_matrix(_table(matrix), 8)
    assert back.dtype == np.float16 and back.shape == (5, 8)
    np.testing.assert_allclose(back.astype(np.float32), matrix, rtol=1e-3, atol=1e-3)


def test_any_embedding_column_reads_the_same_way():
    matrix = np.eye(3, dtype=np.float32)
    assert (embedding_matrix(_table(matrix, TEXT_EMBEDDING), None, TEXT_EMBEDDING) == matrix).all()


def test_a_missing_embedding_names_the_row_and_the_stage_to_run():
    table = _table(np.ones((2, 4), np.float32))
    holes = pa.array([None, [1.0] * 4], pa.list_(pa.float16()))
    with pytest.raises(ValueError, match=r"1 row\(s\) have no image_embedding .*'u0'.*ClipEmbed"):
        embedding_matrix(table.set_column(1, IMAGE_EMBEDDING, holes), None)


def test_a_row_of_the_wrong_length_is_named():
    ragged = pa.table({UID: ["a", "b"], IMAGE_EMBEDDING: pa.array([[1.0] * 4, [1.0] * 3], pa.list_(pa.float16()))})
    with pytest.raises(ValueError, match="'b' has 3 values, not 4"):
        embedding_matrix(ragged, 4)
    with pytest.raises(ValueError, match="shard's first row"):
        embedding_matrix(ragged, None)
