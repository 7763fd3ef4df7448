"""Which rows of a pool make up a sample: every n-th by ``source_index``, the same whatever the
runner, the shards or the batches, and spread over the whole input."""

from __future__ import annotations

import pyarrow as pa

from schemas.columns import SOURCE_INDEX


def systematic_sample(table: pa.Table, share: float) -> pa.Table:
    """The rows of ``table`` whose ``source_index`` is a multiple of ``round(1 / share)``: all of
    them for a share of 1 or more, none for 0."""
    if share <= 0:
        return table.slice(0, 0)
    stride = max(1, round(1 / share))
    return table.filter(pa.array(table[SOURCE_INDEX].to_numpy() % stride == 0))
