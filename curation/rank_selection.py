"""The row at an exact rank of the whole pool, found by counting passes (no row gathered).

Rows are ranked by a float32 score, highest first, ties by uid in byte order (NaN scores last,
``-0.0`` equal to ``0.0``). Each pass counts the rows by a key and narrows down where the rank
lies: the high 16 bits of the score's rank key, then the low 16 bits (the exact score), then the
tied rows' uids 6 bytes at a time until the uid ends. Every pass is a sum by key that a runner
spreads over the cluster; only the counts of one narrowing step reach the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_UID_BYTES = 6
_PAD = b"\0" * _UID_BYTES


@dataclass(frozen=True)
class Narrowing:
    """Where the searched rank lies so far: in the score bucket ``high`` (then at the exact rank
    key ``score_key``, then among the tied uids that start with ``prefix``), at ``rank`` (from 1)
    within it."""

    rank: int
    high: int | None = None
    score_key: int | None = None
    prefix: bytes = b""


def rank_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys ascending in rank order: the highest score first, NaN last."""
    values = scores.astype(np.float32) + np.float32(0.0)  # -0.0 becomes 0.0
    bits = values.view(np.uint32)
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    keys = np.uint32(0xFFFFFFFF) - ascending
    keys[np.isnan(values)] = np.uint32(0xFFFFFFFF)
    return keys


def score_of(key: int) -> float:
    """The float32 score whose rank key is ``key``."""
    ascending = 0xFFFFFFFF - key
    bits = ascending ^ 0x80000000 if ascending >> 31 else ~ascending & 0xFFFFFFFF
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def pass_keys(scores: np.ndarray, uids: pa.Array, where: Narrowing | None) -> np.ndarray:
    """This pass's key of each row still in the running (a subset for the later passes)."""
    keys = rank_keys(scores)
    if where is None:
        return (keys >> np.uint32(16)).astype(np.int64)
    if where.score_key is None:
        return (keys[(keys >> np.uint32(16)) == where.high] & np.uint32(0xFFFF)).astype(np.int64)
    tied = uids.filter(pa.array(keys == where.score_key)).cast(pa.binary())
    if isinstance(tied, pa.ChunkedArray):
        tied = tied.combine_chunks()
    if where.prefix:
        tied = tied.filter(pc.starts_with(tied, pattern=where.prefix))
    return _uid_chunk(tied, len(where.prefix))


def counted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, counts = np.unique(keys, return_counts=True)
    return values.astype(np.int64), counts.astype(np.int64)


def narrow(keys: np.ndarray, counts: np.ndarray, where: Narrowing) -> tuple[Narrowing, str | None]:
    """The next narrowing from one pass's counts (keys ascending), and the uid once it is known."""
    cumulative = np.cumsum(counts)
    at = int(np.searchsorted(cumulative, where.rank))
    key, rank = int(keys[at]), where.rank - (int(cumulative[at - 1]) if at else 0)
    if where.high is None:
        return Narrowing(rank, high=key), None
    if where.score_key is None:
        return Narrowing(rank, high=where.high, score_key=(where.high << 16) | key), None
    chunk = key.to_bytes(_UID_BYTES, "big")
    if 0 in chunk:  # the uid ends in this chunk (a uid holds no NUL)
        return where, (where.prefix + chunk[: chunk.index(0)]).decode("utf-8")
    return Narrowing(rank, where.high, where.score_key, where.prefix + chunk), None


def _uid_chunk(uids: pa.Array, start: int) -> np.ndarray:
    """Bytes ``start`` to ``start + 6`` of each uid as a big-endian integer, zero-padded."""
    if not len(uids):
        return np.zeros(0, np.int64)
    window = pc.binary_slice(uids, start, start + _UID_BYTES)
    padded = pc.binary_slice(pc.binary_join_element_wise(window, pa.scalar(_PAD), pa.scalar(b"")), 0, _UID_BYTES)
    fixed = padded.cast(pa.binary(_UID_BYTES))
    raw = np.frombuffer(fixed.buffers()[1], np.uint8)[fixed.offset * _UID_BYTES :][: len(fixed) * _UID_BYTES]
    digits = raw.reshape(-1, _UID_BYTES).astype(np.int64)
    return digits @ (np.int64(256) ** np.arange(_UID_BYTES - 1, -1, -1, dtype=np.int64))
