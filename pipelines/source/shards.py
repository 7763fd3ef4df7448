"""Reading a url pool (parquet, csv, tsv, jsonl; one file, a folder or a glob) into shards.

Every input row becomes either a row of the ``00_input`` phase, with a stable ``uid`` and its
``source_index``, or a reject record of the ``read`` stage with a reason (see
:mod:`pipelines.source.readers` for the reasons found while parsing; the repeats of a uid the pool
supplies itself are found over the whole pool by :mod:`pipelines.engine.unique_key`). A bad row costs only that row,
and damage inside a file only what cannot be read of it (``unreadable_input``); the next file is
read all the same. Problems with a whole file raise :class:`SourceError` naming the file and the
fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
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
    buffer: list[pa.Table] = []
    buffered = 0
    shard = 0
    for path in files:
        for chunk in read_file(path, fmt, spec, kept):
            buffer.append(chunk)
            buffered += chunk.num_rows
            while buffered >= shard_size:
                table = pa.concat_tables(buffer)
                yield _finish_shard(shard, table.slice(0, shard_size), shard * shard_size, spec)
                shard += 1
                rest = table.slice(shard_size)
                buffer, buffered = [rest], rest.num_rows
    if buffered:
        yield _finish_shard(shard, pa.concat_tables(buffer), shard * shard_size, spec)
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
    known only by reading them)."""
    files = resolve_files(spec.path)
    if detect_format(files, spec.format) != "parquet":
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
    return _finish_shard(read.shard, pa.concat_tables(tables), read.first_index, spec)


def check_keep_columns(keep: tuple[str, ...]) -> None:
    """Kept input columns must not collide with registered columns or reject-record fields."""
    reserved = set(COLUMNS) | {STAGE, REASON, DETAIL, SHARD, REJECT_REASON, REJECT_DETAIL}
    clash = [k for k in keep if k in reserved]
    if clash:
        raise SourceError(f"columns.keep names reserved column(s) {clash}; rename them in the input")


def _finish_shard(shard: int, table: pa.Table, first_index: int, spec: SourceSpec) -> InputShard:
    n = table.num_rows
    index = pa.array(np.arange(first_index, first_index + n, dtype=np.int64))
    if spec.uid_column:
        uid = pc.coalesce(table[UID], _uids(index, pa.nulls(n, pa.string()), pa.nulls(n, pa.string())))
    else:
        uid = _uids(index, pc.coalesce(table[URL], table[REJECT_DETAIL]), table[CAPTION])
    front = {UID: uid, SOURCE_INDEX: index, URL: table[URL], CAPTION: table[CAPTION]}
    table = pa.table({**front, **{name: table[name] for name in table.column_names if name not in front}})
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
