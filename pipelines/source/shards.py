"""Reading a url pool (parquet, csv, tsv, jsonl; one file, a folder or a glob) into shards.

Every input row becomes either a row of the ``00_input`` phase, with a stable ``uid`` and its
``source_index``, or a reject record of the ``read`` stage with a reason (see
:mod:`pipelines.source.readers` for the reasons found while parsing; ``duplicate_uid`` marks a repeat of
a uid the pool supplies itself, the first occurrence being kept). A bad row costs only that row,
and damage inside a file only what cannot be read of it (``unreadable_input``); the next file is
read all the same. Problems with a whole file raise :class:`SourceError` naming the file and the
fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.engine.chain import split_rejected
from pipelines.engine.parts import InputShard
from pipelines.source.readers import (
    SourceError,
    SourceSpec,
    check_file,
    detect_format,
    keep_types,
    read_file,
    read_parquet_rows,
    resolve_files,
    row_group_rows,
)
from pipelines.source.row_hash import row_uids
from schemas import rejects as R
from schemas.columns import CAPTION, COLUMNS, SOURCE_INDEX, UID, URL
from schemas.rejects import DETAIL, REASON, REJECT_DETAIL, REJECT_REASON, SHARD, STAGE

__all__ = [
    "READ_STAGE",
    "SourceError",
    "SourceSpec",
    "check_keep_columns",
    "probe_source",
    "read_shards",
    "resolve_files",
]

READ_STAGE = "read"


def probe_source(spec: SourceSpec) -> None:
    """Fail now, before anything is written, if the input cannot be read as configured."""
    files = resolve_files(spec.path)
    fmt = detect_format(files, spec.format)
    for path in files if fmt == "parquet" else files[:1]:  # parquet: every footer is cheap to read
        check_file(path, fmt, spec)
    keep_types(files, fmt, spec)


def read_shards(spec: SourceSpec, shard_size: int) -> Iterator[InputShard]:
    """Read the pool and cut it into shards of ``shard_size`` input rows, in input order."""
    files = resolve_files(spec.path)
    fmt = detect_format(files, spec.format)
    kept = keep_types(files, fmt, spec)
    uid_guard = _UidGuard(_repeated_uids(files, fmt, spec, kept)) if spec.uid_column else None
    buffer: list[pa.Table] = []
    buffered = 0
    shard = 0
    for path in files:
        for chunk in read_file(path, fmt, spec, kept):
            buffer.append(chunk)
            buffered += chunk.num_rows
            while buffered >= shard_size:
                table = pa.concat_tables(buffer)
                yield _finish_shard(shard, table.slice(0, shard_size), shard * shard_size, spec, uid_guard)
                shard += 1
                rest = table.slice(shard_size)
                buffer, buffered = [rest], rest.num_rows
    if buffered:
        yield _finish_shard(shard, pa.concat_tables(buffer), shard * shard_size, spec, uid_guard)
    elif shard == 0:
        raise SourceError(f"input {spec.path!r} holds no rows")


@dataclass(frozen=True)
class ShardRead:
    """Where the rows of input shard ``shard`` lie: ``(file, row group, first row in it, rows)``
    pieces of a parquet pool, and the types of its kept columns; a worker reads it alone."""

    shard: int
    first_index: int
    pieces: tuple[tuple[str, int, int, int], ...]
    kept: tuple[tuple[str, pa.DataType], ...]


def plan_parquet_reads(spec: SourceSpec, shard_size: int) -> list[ShardRead] | None:
    """The pool's shards planned from its parquet footers alone (the same cut as
    :func:`read_shards`), or None when they must be read in order (text formats, whose rows are
    known only by reading them; a pool-supplied uid, whose repeats need a pass over the pool)."""
    files = resolve_files(spec.path)
    if detect_format(files, spec.format) != "parquet" or spec.uid_column:
        return None
    kept = tuple(keep_types(files, "parquet", spec).items())
    reads: list[ShardRead] = []
    pieces: list[tuple[str, int, int, int]] = []
    filled = 0
    for path in files:
        for group, rows in enumerate(row_group_rows(path)):
            start = 0
            while start < rows:
                take = min(rows - start, shard_size - filled)
                pieces.append((path, group, start, take))
                start, filled = start + take, filled + take
                if filled == shard_size:
                    reads.append(ShardRead(len(reads), len(reads) * shard_size, tuple(pieces), kept))
                    pieces, filled = [], 0
    if pieces:
        reads.append(ShardRead(len(reads), len(reads) * shard_size, tuple(pieces), kept))
    if not reads:
        raise SourceError(f"input {spec.path!r} holds no rows")
    return reads


def read_planned_shard(spec: SourceSpec, read: ShardRead) -> InputShard:
    """One planned shard, read on its own: the rows :func:`read_shards` gives for it."""
    kept = dict(read.kept)
    tables = [read_parquet_rows(path, group, start, n, spec, kept) for path, group, start, n in read.pieces]
    return _finish_shard(read.shard, pa.concat_tables(tables), read.first_index, spec, None)


def check_keep_columns(keep: tuple[str, ...]) -> None:
    """Kept input columns must not collide with registered columns or reject-record fields."""
    reserved = set(COLUMNS) | {STAGE, REASON, DETAIL, SHARD, REJECT_REASON, REJECT_DETAIL}
    clash = [k for k in keep if k in reserved]
    if clash:
        raise SourceError(f"columns.keep names reserved column(s) {clash}; rename them in the input")


def _finish_shard(
    shard: int, table: pa.Table, first_index: int, spec: SourceSpec, uid_guard: _UidGuard | None
) -> InputShard:
    n = table.num_rows
    index = pa.array(np.arange(first_index, first_index + n, dtype=np.int64))
    if spec.uid_column:
        uid = pc.coalesce(table[UID], _uids(index, pa.nulls(n, pa.string()), pa.nulls(n, pa.string())))
    else:
        uid = _uids(index, pc.coalesce(table[URL], table[REJECT_DETAIL]), table[CAPTION])
    front = {UID: uid, SOURCE_INDEX: index, URL: table[URL], CAPTION: table[CAPTION]}
    table = pa.table({**front, **{name: table[name] for name in table.column_names if name not in front}})
    if uid_guard is not None:
        table = uid_guard.mark(table)
    kept, rejects, counts = split_rejected(table, READ_STAGE, shard)
    return InputShard(shard, kept, rejects, counts)


def _uids(index: pa.Array, url: pa.Array, caption: pa.Array) -> pa.Array:
    """Stable 128-bit ids from each row's position, url and caption (same across runs and runners;
    see :mod:`pipelines.source.row_hash`). A rejected row without a url hashes its reject detail
    in the url's place."""
    keys = pc.binary_join_element_wise(
        pc.cast(index, pa.string()), pc.fill_null(url, ""), pc.fill_null(caption, ""), "\x1f"
    )
    return row_uids(keys)


def _uid_hashes(uid: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pl.Series(uid).hash(seed=0x0DD_0DD).to_numpy()


def _repeated_uids(files: list[str], fmt: str, spec: SourceSpec, kept) -> np.ndarray:
    """Hashes of the uids the pool supplies more than once (a first pass over the uid column)."""
    hashes = []
    for path in files:
        for chunk in read_file(path, fmt, spec, kept):
            valid = chunk.filter(pc.is_null(chunk[REJECT_REASON]))[UID]
            if len(valid):
                hashes.append(_uid_hashes(valid))
    if not hashes:
        return np.empty(0, np.uint64)
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    return values[counts > 1]


class _UidGuard:
    """Rejects every repeat of a pool-supplied uid after its first occurrence (in input order)."""

    def __init__(self, repeated_hashes: np.ndarray) -> None:
        self.repeated = repeated_hashes
        self.first_seen: dict[str, int] = {}

    def mark(self, table: pa.Table) -> pa.Table:
        if not len(self.repeated):
            return table
        candidates = np.isin(_uid_hashes(table[UID]), self.repeated) & pc.is_null(table[REJECT_REASON]).to_numpy(
            zero_copy_only=False
        )
        duplicate = np.zeros(table.num_rows, dtype=bool)
        details: list[str | None] = [None] * table.num_rows
        uids, indices = table[UID].to_pylist(), table[SOURCE_INDEX].to_pylist()
        for i in np.flatnonzero(candidates):  # hash matches: compare the uids themselves
            first = self.first_seen.setdefault(uids[i], indices[i])
            if first != indices[i]:
                duplicate[i] = True
                details[i] = f"uid {uids[i]!r} first seen at input row {first}"
        if not duplicate.any():
            return table
        merged_reason = pc.if_else(pa.array(duplicate), pa.scalar(R.DUPLICATE_UID), table[REJECT_REASON])
        merged_detail = pc.if_else(pa.array(duplicate), pa.array(details, pa.string()), table[REJECT_DETAIL])
        return table.set_column(table.schema.get_field_index(REJECT_REASON), REJECT_REASON, merged_reason).set_column(
            table.schema.get_field_index(REJECT_DETAIL), REJECT_DETAIL, merged_detail
        )
