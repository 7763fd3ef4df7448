"""Input files: finding them, telling their format, resolving columns, reading normalised chunks.

Every reader yields tables of one fixed schema: ``url`` and ``caption`` (UTF-8 text, null where
unusable), ``uid`` when the pool has its own, the kept columns, and the two reserved reject
columns set for rows already known bad, in input order:

* ``malformed_row``: a row that does not parse (a csv/tsv record with the wrong number of
  fields, a jsonl line that is not a JSON object or nests too deeply), a line or record longer
  than ``max_row_bytes`` and a csv quote never closed (see :mod:`pipelines.source.text_records` and
  :mod:`pipelines.source.jsonl_rows`);
* ``missing_url``, ``url_not_text``, ``url_not_utf8``, ``missing_caption``, ``caption_not_text``,
  ``caption_not_utf8``, ``missing_uid``, ``uid_not_utf8`` and ``kept_column_not_utf8`` (the
  detail names the column);
* ``unreadable_input``: rows a damaged file loses: each row of a parquet row group that cannot
  be read, or one record for the rest of a truncated or corrupt compressed csv/tsv/jsonl file.

Problems with a whole file (no header, an unreadable footer, columns of the wrong type, a column
twice) raise :class:`SourceError` naming the file and what to change.

Kept columns hold text for csv, tsv and jsonl (JSON values other than strings as JSON text); in
parquet they keep their type, unified over all input files, so every shard has one schema.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.engine.config import DEFAULT_MAX_ROW_BYTES
from pipelines.source import jsonl_rows
from pipelines.source.row_values import interleave, is_text, normalise, reject_rows, value_type
from pipelines.source.text_chunk import CSV, JSONL, TSV, Dialect, preview
from pipelines.source.text_records import RecordBatch, RecordReader
from pipelines.stage import storage
from schemas import rejects as R
from schemas.columns import CAPTION, CAPTION_CANDIDATES, UID, URL, URL_CANDIDATES
from schemas.rejects import REJECT_DETAIL, REJECT_REASON

FORMATS = ("parquet", "csv", "tsv", "jsonl")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_CHUNK_ROWS = 65536
_DIALECTS = {"csv": CSV, "tsv": TSV}
_PYARROW_INVALID_ROW = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+)")


class SourceError(ValueError):
    """The input as a whole cannot be read: the message names the file and what to change."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the pool is and which of its columns hold the url, caption and (optionally) uid.

    ``url_column`` / ``caption_column`` set to ``"auto"`` pick the first present of
    ``URL_CANDIDATES`` / ``CAPTION_CANDIDATES`` (``url``/``caption``, LAION's ``URL``/``TEXT``, …).
    ``keep_columns`` are carried through. ``max_row_bytes`` bounds a csv/tsv record and a jsonl
    line: a longer one is a ``malformed_row``, skipped without being held in memory.
    """

    path: str
    format: str = "auto"
    url_column: str = "auto"
    caption_column: str = "auto"
    uid_column: str | None = None
    keep_columns: tuple[str, ...] = field(default_factory=tuple)
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES


def resolve_files(path: str) -> list[str]:
    """The input files named by a file path or URI, a folder (its files) or a glob, sorted."""
    try:
        if any(ch in path for ch in "*?["):
            files = storage.glob(path)
            if not files:
                raise SourceError(f"input glob {path!r} matches no file")
            return files
        where = storage.kind(path)
        if where == "folder":
            files = [
                f
                for f in storage.list_folder(path)
                if not f.rpartition("/")[2].startswith((".", "_")) and _format_of(f) is not None
            ]
            if not files:
                raise SourceError(f"input folder {path!r} holds no .parquet, .csv, .tsv or .jsonl file")
            return files
    except storage.StorageError as error:
        raise SourceError(f"input {error}") from None
    if where == "missing":
        raise SourceError(f"input file {path!r} does not exist")
    return [path]


def detect_format(files: list[str], requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in FORMATS:
            raise SourceError(f"input_format {requested!r} is not one of: auto, {', '.join(FORMATS)}")
        return requested
    formats = {_format_of(f) for f in files}
    if None in formats or len(formats) != 1:
        raise SourceError(
            f"cannot tell the input format from the file names {files[:3]}; set input_format to one of "
            f"{', '.join(FORMATS)} (all input files must share one format)"
        )
    return formats.pop()


def check_file(path: str, fmt: str, spec: SourceSpec) -> tuple[str, str]:
    """Resolve the url and caption columns of ``path`` and check what can be checked cheaply."""
    try:
        size = storage.file_size(path)
    except storage.StorageError as error:
        raise SourceError(f"input {error}") from None
    if size == 0:
        raise SourceError(f"input file {path!r} is empty")
    if fmt == "parquet":
        schema = _parquet(path).schema_arrow
        url_col, caption_col = resolve_columns(schema.names, spec, path)
        _check_parquet_types(schema, url_col, caption_col, spec, path)
        return url_col, caption_col
    if fmt == "jsonl":
        with _records(path, JSONL, spec) as reader:
            keys = jsonl_rows.first_keys(reader)
        if reader.failure is not None and not reader.lines_read:
            raise SourceError(f"input file {path!r} cannot be read: {reader.failure}")
        # No JSON object among the first records: every line is malformed (or the file is blank).
        return resolve_columns(keys, spec, path) if keys else (URL, CAPTION)
    with _records(path, _DIALECTS[fmt], spec) as reader:
        return resolve_columns(_header_names(reader, path, fmt), spec, path)


def keep_types(files: list[str], fmt: str, spec: SourceSpec) -> dict[str, pa.DataType]:
    """The type of each kept column in every shard: text, or (parquet) unified over all files."""
    if fmt != "parquet" or not spec.keep_columns:
        return {name: pa.string() for name in spec.keep_columns}
    for f in files:
        check_file(f, fmt, spec)
    schemas = [pa.schema([_parquet(f).schema_arrow.field(n) for n in spec.keep_columns]) for f in files]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SourceError(f"input files disagree on the types of kept columns {list(spec.keep_columns)}: {e}") from None
    return {f.name: f.type for f in unified}


def read_file(path: str, fmt: str, spec: SourceSpec, kept: dict[str, pa.DataType]) -> Iterator[pa.Table]:
    """Normalised chunks of one input file (see the module docstring)."""
    url_col, caption_col = check_file(path, fmt, spec)
    schema = _schema(spec, kept)
    if fmt == "parquet":
        yield from _read_parquet(path, spec, url_col, caption_col, schema)
    elif fmt == "jsonl":
        with _records(path, JSONL, spec) as reader:
            yield from jsonl_rows.read_rows(reader, spec, url_col, caption_col, schema, _CHUNK_ROWS)
    else:
        yield from _read_delimited(path, fmt, spec, url_col, caption_col, schema)


def resolve_columns(names: list[str], spec: SourceSpec, path: str) -> tuple[str, str]:
    url_col = _pick(names, spec.url_column, URL_CANDIDATES, "columns.url", path)
    caption_col = _pick(names, spec.caption_column, CAPTION_CANDIDATES, "columns.caption", path)
    for name, key in [(spec.uid_column, "columns.uid")] + [(k, "columns.keep") for k in spec.keep_columns]:
        if name and name not in names:
            raise SourceError(f"{key}: column {name!r} is not in {path!r}; its columns are {names}")
    for name in _wanted_columns(url_col, caption_col, spec):
        if names.count(name) > 1:
            raise SourceError(
                f"column {name!r} appears {names.count(name)} times in {path!r}; rename or drop the "
                f"copies so that it names one column"
            )
    return url_col, caption_col


# Formats ---------------------------------------------------------------------------------------


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(storage.open_input_file(path) if storage.is_uri(path) else path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"input file {path!r} is not a readable parquet file: {e}") from None


def _check_parquet_types(schema: pa.Schema, url_col: str, caption_col: str, spec: SourceSpec, path: str) -> None:
    for name, key in ((url_col, "columns.url"), (caption_col, "columns.caption")):
        type_ = schema.field(name).type
        if not is_text(type_):
            raise SourceError(f"{key}: column {name!r} of {path!r} has type {type_}; it must hold text")
    if spec.uid_column:
        type_ = schema.field(spec.uid_column).type
        if not (is_text(type_) or pa.types.is_integer(value_type(type_))):
            raise SourceError(
                f"columns.uid: column {spec.uid_column!r} of {path!r} has type {type_}; a uid must be text or integers"
            )


def _read_parquet(path: str, spec: SourceSpec, url_col: str, caption_col: str, schema: pa.Schema) -> Iterator[pa.Table]:
    """Row group by row group; the rows of a group that cannot be read are ``unreadable_input``."""
    file = _parquet(path)
    for group in range(file.num_row_groups):
        yield from _row_group(file, group, path, spec, url_col, caption_col, schema)


def row_group_rows(path: str) -> list[int]:
    """The rows of each row group of a parquet file, from its footer."""
    metadata = _parquet(path).metadata
    return [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]


def read_parquet_rows(
    path: str, group: int, start: int, length: int, spec: SourceSpec, kept: dict[str, pa.DataType]
) -> pa.Table:
    """Rows ``start`` to ``start + length`` of row group ``group`` of a parquet file, normalised as
    :func:`read_file` gives them (rows that cannot be read as ``unreadable_input`` rejects)."""
    url_col, caption_col = check_file(path, "parquet", spec)
    schema = _schema(spec, kept)
    chunks = list(_row_group(_parquet(path), group, path, spec, url_col, caption_col, schema, start, start + length))
    return pa.concat_tables(chunks) if chunks else schema.empty_table()


def _row_group(
    file: pq.ParquetFile,
    group: int,
    path: str,
    spec: SourceSpec,
    url_col: str,
    caption_col: str,
    schema: pa.Schema,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[pa.Table]:
    """Rows ``start`` to ``stop`` of a row group, normalised. A row group is decoded from its start
    (parquet has no row offsets within one), but no further than ``stop`` and only the window is normalised."""
    group_rows = file.metadata.row_group(group).num_rows
    stop = group_rows if stop is None else min(stop, group_rows)
    batches = file.iter_batches(
        batch_size=_CHUNK_ROWS, row_groups=[group], columns=_wanted_columns(url_col, caption_col, spec)
    )
    read = 0
    while read < stop:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as e:
            first_lost = max(read, start)
            detail = f"input file {path!r}, row group {group}: {group_rows - read} of its rows cannot be read: {e}"
            for first in range(first_lost, stop, _CHUNK_ROWS):
                n = min(_CHUNK_ROWS, stop - first)
                yield reject_rows(schema, [R.UNREADABLE_INPUT] * n, [detail] * n)
            return
        if batch is None:
            return
        window = batch.slice(max(start - read, 0), stop - max(start, read))
        read += batch.num_rows
        if window.num_rows:
            yield normalise(pa.Table.from_batches([window]), url_col, caption_col, spec, schema)


def _records(path: str, dialect: Dialect, spec: SourceSpec) -> RecordReader:
    try:
        return RecordReader(path, dialect, spec.max_row_bytes)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"input file {path!r} cannot be opened: {e}") from None


def _delimited_options(fmt: str) -> dict:
    csv = fmt == "csv"  # TSV pools (img2dataset's) are unquoted: a stray quote is caption text
    return dict(delimiter="," if csv else "\t", newlines_in_values=csv, quote_char='"' if csv else False)


def _header_names(reader: RecordReader, path: str, fmt: str) -> list[str]:
    """The column names on the header line of a csv/tsv file."""
    try:
        header = reader.header()
        if header is None:
            raise ValueError("it holds no header line")
        return pacsv.read_csv(
            pa.py_buffer(header + b"\n"),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(**_delimited_options(fmt)),
        ).column_names
    except ValueError as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"input file {path!r} cannot be parsed as {fmt}: {e}") from None


def _read_delimited(
    path: str, fmt: str, spec: SourceSpec, url_col: str, caption_col: str, schema: pa.Schema
) -> Iterator[pa.Table]:
    with _records(path, _DIALECTS[fmt], spec) as reader:
        names = _header_names(reader, path, fmt)
        wanted = _wanted_columns(url_col, caption_col, spec)
        parse = _record_parser(fmt, names, wanted)
        for batch in reader.batches(fields=len(names)):
            tables, invalid = _parse_records(batch, parse)
            rows = (
                normalise(pa.concat_tables(tables).rename_columns(wanted), url_col, caption_col, spec, schema)
                if tables
                else schema.empty_table()
            )
            yield interleave(rows, _batch_rejects(batch, invalid, reader.dialect.label), schema)


def _record_parser(fmt: str, names: list[str], wanted: list[str]):
    """``parse(text, first, invalid)``: pyarrow's table of the wanted columns of whole records, noting
    ``(record index, why)`` in ``invalid`` for each record with the wrong number of fields."""
    # Columns by position: header names may repeat or be empty where they are not wanted.
    positions = [str(names.index(name)) for name in wanted]
    # Text is read unchecked and checked per value in normalise: bad UTF-8 costs only its row.
    convert = pacsv.ConvertOptions(
        include_columns=positions, column_types=dict.fromkeys(positions, pa.string()), check_utf8=False
    )

    def parse(text: pa.Buffer, first: int, invalid: list[tuple[int, str]]) -> pa.Table:
        def on_invalid(row) -> str:  # numbered from 1 in ``text`` (known, as it is read without threads)
            invalid.append(
                (
                    first + row.number - 1,
                    f"expected {row.expected_columns} columns, got {row.actual_columns}: {preview(row.text)}",
                )
            )
            return "skip"

        return pacsv.read_csv(
            text,
            read_options=pacsv.ReadOptions(
                column_names=[str(i) for i in range(len(names))], use_threads=False, block_size=text.size + 1
            ),
            parse_options=pacsv.ParseOptions(**_delimited_options(fmt), invalid_row_handler=on_invalid),
            convert_options=convert,
        )

    return parse


def _parse_records(batch: RecordBatch, parse) -> tuple[list[pa.Table], list[tuple[int, str]]]:
    """The tables of the batch's records, in order, and ``(record index, why)`` of the invalid ones."""
    tables: list[pa.Table] = []
    invalid: list[tuple[int, str]] = []
    first = 0
    while first < len(batch.starts):
        noted = len(invalid)
        try:
            tables.append(parse(batch.text(first), first, invalid))
            break
        except pa.ArrowInvalid as e:
            # pyarrow cannot hand its invalid-row handler a row that is not UTF-8: it stops, naming the row.
            found = _PYARROW_INVALID_ROW.search(str(e))
            if found is None:
                raise
            del invalid[noted:]
            bad = first + int(found.group(1)) - 1
            if bad > first:
                tables.append(parse(batch.text(first, bad), first, invalid))
            invalid.append(
                (
                    bad,
                    f"expected {found.group(2)} columns, got {found.group(3)}: {preview(batch.run_text(bad, bad + 1))}",
                )
            )
            first = bad + 1
    return tables, invalid


def _batch_rejects(batch: RecordBatch, invalid: list[tuple[int, str]], label: str) -> list[tuple[int, str, str]]:
    """``(position, reason, detail)`` of the batch's rejects and invalid records, by position in the batch."""
    slots = [r.slot for r in batch.rejects]
    found = [(r.slot + i, r.reason, r.detail) for i, r in enumerate(batch.rejects)]
    found += [
        (k + bisect.bisect_right(slots, k), R.MALFORMED_ROW, f"{label} {batch.lines[k]}: {why}") for k, why in invalid
    ]
    return sorted(found)


# Normalisation ---------------------------------------------------------------------------------


def _format_of(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return _EXTENSIONS.get(os.path.splitext(base)[1].lower())


def _pick(names, requested, candidates, key, path) -> str:
    if requested != "auto":
        if requested not in names:
            raise SourceError(f"{key}: column {requested!r} is not in {path!r}; its columns are {names}")
        return requested
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise SourceError(
        f"{key}: no column of {path!r} looks like one (looked for {', '.join(candidates)}); its columns are "
        f"{names}: set {key} in the config"
    )


def _wanted_columns(url_col: str, caption_col: str, spec: SourceSpec) -> list[str]:
    return list(
        dict.fromkeys([url_col, caption_col, *([spec.uid_column] if spec.uid_column else []), *spec.keep_columns])
    )


def _schema(spec: SourceSpec, kept: dict[str, pa.DataType]) -> pa.Schema:
    fields = [pa.field(URL, pa.string()), pa.field(CAPTION, pa.string())]
    if spec.uid_column:
        fields.append(pa.field(UID, pa.string()))
    fields += [pa.field(name, kept.get(name, pa.string())) for name in spec.keep_columns]
    return pa.schema(fields + [pa.field(REJECT_REASON, pa.string()), pa.field(REJECT_DETAIL, pa.string())])
