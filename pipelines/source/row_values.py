"""One chunk of an input file as the pool's rows: typed url, caption, uid and kept columns, with a
reject reason for every row that cannot be used (and rows that are nothing but a reject)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.stage import Rejections
from schemas import rejects as R
from schemas.columns import CAPTION, UID, URL
from schemas.rejects import REJECT_DETAIL, REJECT_REASON

if TYPE_CHECKING:
    from pipelines.source.readers import SourceSpec

_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())
_TEXT_TYPES = (*_STRING_TYPES, pa.binary(), pa.large_binary(), pa.null())


def normalise(table: pa.Table, url_col: str, caption_col: str, spec: SourceSpec, schema: pa.Schema) -> pa.Table:
    """Typed url/caption/uid/keep columns plus reject columns for rows that are unusable, as ``schema``."""
    rejections = Rejections(table.num_rows)
    url_values, caption_values = _decoded(table[url_col]), _decoded(table[caption_col])
    url, bad_url = _as_utf8(url_values)
    caption, bad_caption = _as_utf8(caption_values)
    rejections.add(
        pc.or_kleene(pc.is_null(url_values), _is_empty(url_values)), R.MISSING_URL, f"no value in column {url_col!r}"
    )
    rejections.add(bad_url, R.URL_NOT_UTF8, f"{url_col!r} is not valid UTF-8")
    rejections.add(pc.is_null(caption_values), R.MISSING_CAPTION, f"no value in column {caption_col!r}")
    rejections.add(bad_caption, R.CAPTION_NOT_UTF8, f"{caption_col!r} is not valid UTF-8")
    columns = {URL: url, CAPTION: caption}
    if spec.uid_column:
        columns[UID] = _uid(table[spec.uid_column], spec.uid_column, rejections)
    for name in spec.keep_columns:
        columns[name] = _kept(table[name], name, rejections)
    table = pa.table(columns)
    if rejections.any:
        return rejections.attach(table).cast(schema)
    # Keep the schema fixed: the reject columns are always there.
    return (
        table.append_column(REJECT_REASON, pa.nulls(table.num_rows, pa.string()))
        .append_column(REJECT_DETAIL, pa.nulls(table.num_rows, pa.string()))
        .cast(schema)
    )


def _uid(column: pa.ChunkedArray, name: str, rejections: Rejections) -> pa.Array:
    """The pool's uids as text (null where missing or not UTF-8), rejecting those rows."""
    values = _decoded(column)
    if is_text(values.type):
        uid, bad = _as_utf8(values)
        empty = pc.or_kleene(pc.is_null(values), _is_empty(values))
    else:  # integers: check_file allows no other type
        uid, bad = values.cast(pa.string()), None
        empty = pc.is_null(values)
    rejections.add(empty, R.MISSING_UID, f"no value in column {name!r}")
    if bad is not None:
        rejections.add(bad, R.UID_NOT_UTF8, f"{name!r} is not valid UTF-8")
    return pc.if_else(empty, pa.scalar(None, pa.string()), uid)


def _kept(column: pa.ChunkedArray, name: str, rejections: Rejections) -> pa.ChunkedArray | pa.Array:
    """A kept column as read; a text column's values that are not UTF-8 become null, rejecting their rows."""
    if value_type(column.type) not in _STRING_TYPES:
        return column  # numbers, bytes and nested values are kept as they are
    values, bad = _as_utf8(_decoded(column))
    if not pc.any(bad).as_py():
        return column
    rejections.add(bad, R.KEPT_COLUMN_NOT_UTF8, f"{name!r} is not valid UTF-8")
    return values


def value_type(type_: pa.DataType) -> pa.DataType:
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def is_text(type_: pa.DataType) -> bool:
    return value_type(type_) in _TEXT_TYPES


def _is_empty(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.equal(pc.binary_length(column.cast(pa.binary())), 0)


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded columns (pandas categories) as plain values."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _as_utf8(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """The column as UTF-8 strings, and a mask of values that were not valid UTF-8 (now null)."""
    binary = column.combine_chunks().cast(pa.binary())
    try:
        return binary.cast(pa.string()), pa.repeat(pa.scalar(False), len(binary))
    except pa.ArrowInvalid:
        values, bad = [], []
        for value in binary.to_pylist():
            try:
                values.append(None if value is None else value.decode("utf-8"))
                bad.append(False)
            except UnicodeDecodeError:
                values.append(None)
                bad.append(True)
        return pa.array(values, pa.string()), pa.array(bad, pa.bool_())


def reject_rows(schema: pa.Schema, reasons: list[str], details: list[str]) -> pa.Table:
    """Rows of ``schema`` that hold nothing but a reject reason and detail."""
    n = len(reasons)
    columns = [pa.nulls(n, f.type) for f in schema if f.name not in (REJECT_REASON, REJECT_DETAIL)]
    return pa.Table.from_arrays(
        [*columns, pa.array(reasons, pa.string()), pa.array(details, pa.string())], schema=schema
    )


def interleave(rows: pa.Table, rejects: list[tuple[int, str, str]], schema: pa.Schema) -> pa.Table:
    """``rows`` with a reject row ``(position, reason, detail)`` placed at each position (ascending)."""
    if not rejects:
        return rows
    total = rows.num_rows + len(rejects)
    is_reject = np.zeros(total, dtype=bool)
    is_reject[[position for position, _, _ in rejects]] = True
    order = np.empty(total, dtype=np.int64)
    order[is_reject] = rows.num_rows + np.arange(len(rejects))
    order[~is_reject] = np.arange(rows.num_rows)
    extra = reject_rows(schema, [reason for _, reason, _ in rejects], [detail for _, _, detail in rejects])
    return pa.concat_tables([rows, extra]).take(order)
