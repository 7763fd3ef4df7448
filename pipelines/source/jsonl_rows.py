"""Rows of a jsonl pool: each line parsed as a JSON object, its values checked, gathered into tables.

A line that is not a JSON object (not JSON, not UTF-8, another JSON value, or nested too deeply)
is a ``malformed_row``; an object is checked for its url, caption, uid and kept values with the
reasons listed in :mod:`pipelines.source.readers`. Kept values other than strings are kept as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from pipelines.source.text_chunk import preview
from pipelines.source.text_records import RecordBatch, RecordReader, Reject
from schemas import rejects as R
from schemas.columns import CAPTION, UID, URL
from schemas.rejects import REJECT_DETAIL, REJECT_REASON

if TYPE_CHECKING:
    from pipelines.source.readers import SourceSpec

_JSON = json.JSONDecoder()


def read_rows(
    reader: RecordReader, spec: SourceSpec, url_col: str, caption_col: str, schema: pa.Schema, rows_per_table: int
) -> Iterator[pa.Table]:
    """Tables of ``schema`` holding one row for each non-blank line and each reject of ``reader``."""
    columns: dict[str, list] = {}
    for batch in reader.batches():
        for item in _lines(batch):
            if isinstance(item, Reject):
                _append_row(columns, spec, {}, url_col, caption_col, item.reason, item.detail)
            elif item[1].strip():  # blank lines are not rows
                line, text = item
                try:
                    record = _json_object(text)
                except ValueError as e:
                    _append_row(
                        columns, spec, {}, url_col, caption_col, R.MALFORMED_ROW, f"line {line}: {e}: {preview(text)}"
                    )
                else:
                    reason, detail = _check_row(record, url_col, caption_col, spec)
                    _append_row(columns, spec, record, url_col, caption_col, reason, detail)
            if columns and len(columns[URL]) >= rows_per_table:
                yield pa.Table.from_pydict(columns, schema=schema)
                columns = {}
    if columns:
        yield pa.Table.from_pydict(columns, schema=schema)


def first_keys(reader: RecordReader, records: int = 1000) -> list[str]:
    """Keys seen in the first ``records`` JSON objects of ``reader``, in order of appearance."""
    keys: dict[str, None] = {}
    seen = 0
    for batch in reader.batches():
        for item in _lines(batch):
            try:
                record = None if isinstance(item, Reject) else _json_object(item[1])
            except ValueError:
                continue
            if record is not None:
                keys.update(dict.fromkeys(record))
                seen += 1
                if seen >= records:
                    return list(keys)
    return list(keys)


def _lines(batch: RecordBatch) -> Iterator[tuple[int, str | bytes] | Reject]:
    """``(line number, text)`` of each line of a batch (bytes where not UTF-8), and its rejects."""
    for run in batch.runs():
        if isinstance(run, Reject):
            yield run
            continue
        raw = batch.run_text(*run)
        try:
            lines = str(raw, "utf-8").split("\n")
        except UnicodeDecodeError:  # then line by line, so that only the bad line is rejected
            lines = bytes(raw).split(b"\n")
        yield from enumerate(lines[:-1], start=int(batch.lines[run[0]]))


def _json_object(text: str | bytes) -> dict:
    """The JSON object on one line; ValueError saying why for anything else."""
    try:
        record = _JSON.decode(text if isinstance(text, str) else str(text, "utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    return record


def _check_row(record: dict, url_col: str, caption_col: str, spec: SourceSpec) -> tuple[str | None, str | None]:
    """The reject reason and detail of a JSON object, or ``(None, None)`` for a good row."""
    url, caption = record.get(url_col), record.get(caption_col)
    if url is None or url == "":
        return R.MISSING_URL, f"no value in column {url_col!r}"
    if not isinstance(url, str):
        return R.URL_NOT_TEXT, f"{url_col!r} holds a JSON {type(url).__name__}"
    if caption is None:
        return R.MISSING_CAPTION, f"no value in column {caption_col!r}"
    if not isinstance(caption, str):
        return R.CAPTION_NOT_TEXT, f"{caption_col!r} holds a JSON {type(caption).__name__}"
    for name, reason in ((url_col, R.URL_NOT_UTF8), (caption_col, R.CAPTION_NOT_UTF8)):
        if _text(record[name]) is None:
            return reason, _not_utf8(name)
    if spec.uid_column:
        uid = record.get(spec.uid_column)
        if uid in (None, ""):
            return R.MISSING_UID, f"no value in column {spec.uid_column!r}"
        if isinstance(uid, str) and _text(uid) is None:
            return R.UID_NOT_UTF8, _not_utf8(spec.uid_column)
    for name in spec.keep_columns:
        value = record.get(name)
        if isinstance(value, str) and _text(value) is None:
            return R.KEPT_COLUMN_NOT_UTF8, _not_utf8(name)
    return None, None


def _not_utf8(name: str) -> str:
    return f"{name!r} is not valid UTF-8 (an unpaired surrogate escape)"


def _text(value) -> str | None:
    """``value`` if it is a string that encodes as UTF-8, else ``None``."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _as_is(value):
    return value


def _append_row(columns, spec, record, url_col, caption_col, reason, detail) -> None:
    """One row; a rejected row keeps whichever of its values are valid text."""
    text = _text if reason else _as_is  # a good row's text is known to be valid
    columns.setdefault(URL, []).append(text(record.get(url_col)))
    columns.setdefault(CAPTION, []).append(text(record.get(caption_col)))
    if spec.uid_column:
        uid = record.get(spec.uid_column)
        columns.setdefault(UID, []).append(
            None if uid in (None, "") else text(uid) if isinstance(uid, str) else str(uid)
        )
    for name in spec.keep_columns:
        value = record.get(name)
        columns.setdefault(name, []).append(
            value if value is None else text(value) if isinstance(value, str) else json.dumps(value)
        )
    columns.setdefault(REJECT_REASON, []).append(reason)
    columns.setdefault(REJECT_DETAIL, []).append(detail)
