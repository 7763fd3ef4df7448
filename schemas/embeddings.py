"""Embeddings in a pool's columns: float16 lists (2 bytes a dimension), written and read back checked."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.columns import IMAGE_EMBEDDING, UID


def float16_lists(matrix: np.ndarray) -> pa.Array:
    """A (rows, dim) matrix as an Arrow list<float16> column, one list a row, without a copy per row."""
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * np.int32(dim))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.astype(np.float16).ravel()))


def embedding_matrix(batch: pa.Table, dim: int | None, column: str = IMAGE_EMBEDDING) -> np.ndarray:
    """An embedding column (``image_embedding`` by default) as a (rows, dim) float16 matrix, or a clear error."""
    values_column = batch[column].combine_chunks()
    if values_column.null_count:
        missing = pc.filter(batch[UID], pc.is_null(batch[column])).to_pylist()
        raise ValueError(
            f"{values_column.null_count} row(s) have no {column} (first uids: {missing[:3]}): "
            f"run ClipEmbed before this stage, and reject rows it cannot embed"
        )
    lengths = pc.list_value_length(values_column).to_numpy(zero_copy_only=False)
    expected = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
    wrong = np.flatnonzero(lengths != expected)
    if len(wrong):
        raise ValueError(
            f"{column} of row {batch[UID][int(wrong[0])].as_py()!r} has {lengths[wrong[0]]} "
            f"values, not {expected}" + (" (dim)" if dim is not None else " (the shard's first row)")
        )
    values = values_column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float16, copy=False).reshape(len(lengths), expected)
