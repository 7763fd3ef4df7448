"""Reading a url pool (parquet, csv, tsv, jsonl; one file, a folder or a glob) into shards.

Every input row becomes either a row of the ``00_input`` phase, with a stable ``uid`` and its
``source_index``, or a reject record of the ``read`` stage with a reason: ``malformed_row``,
``missing_url``, ``url_not_text``, ``url_not_utf8``, ``missing_caption``, ``caption_not_text``,
``caption_not_utf8``, ``missing_uid``. Problems with a whole file (missing, empty, a missing
column, a column that is not text) raise :class:`SourceError` naming the file and the fix.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.chain import reject_records
from schemas import rejects as R
from schemas.columns import CAPTION, COLUMNS, SOURCE_INDEX, UID, URL
from schemas.manifest import StageCounts
from schemas.rejects import DETAIL, REASON, REJECT_DETAIL, REJECT_REASON, SHARD, STAGE

READ_STAGE = "read"
FORMATS = ("parquet", "csv", "tsv", "jsonl")
URL_CANDIDATES = ("url", "URL", "image_url", "img_url")
CAPTION_CANDIDATES = ("caption", "TEXT", "text", "alt_text", "alt", "title")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_CHUNK_ROWS = 65536
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(), pa.string_view(), pa.null())


class SourceError(ValueError):
    """The input as a whole cannot be read: the message names the file and what to change."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the pool is and which of its columns hold the url, caption and (optionally) uid.

    ``url_column`` / ``caption_column`` set to ``"auto"`` pick the first present of
    ``URL_CANDIDATES`` / ``CAPTION_CANDIDATES`` (``url``/``caption``, LAION's ``URL``/``TEXT``, …).
    ``keep_columns`` are carried through unchanged.
    """

    path: str
    format: str = "auto"
    url_column: str = "auto"
    caption_column: str = "auto"
    uid_column: str | None = None
    keep_columns: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class InputShard:
    """One shard of the pool as read: kept rows, reject records and the ``read`` counts."""

    shard: int
    rows: pa.Table
    rejects: pa.Table | None
    counts: StageCounts


def resolve_files(path: str) -> list[str]:
    """The input files named by a file path, a folder (its files) or a glob, sorted."""
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise SourceError(f"input glob {path!r} matches no file")
        return files
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path)
            if not f.startswith((".", "_")) and _format_of(f) is not None
        )
        if not files:
            raise SourceError(f"input folder {path!r} holds no .parquet, .csv, .tsv or .jsonl file")
        return files
    if not os.path.exists(path):
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


def read_shards(spec: SourceSpec, shard_size: int) -> Iterator[InputShard]:
    """Read the pool and cut it into shards of ``shard_size`` input rows, in input order."""
    files = resolve_files(spec.path)
    fmt = detect_format(files, spec.format)
    buffer: list[pa.Table] = []
    buffered = 0
    shard = 0
    position = 0
    for path in files:
        for chunk in _read_file(path, fmt, spec):
            buffer.append(chunk)
            buffered += chunk.num_rows
            while buffered >= shard_size:
                table = _concat(buffer, path)
                yield _finish_shard(shard, table.slice(0, shard_size), position, spec)
                position += shard_size
                shard += 1
                rest = table.slice(shard_size)
                buffer, buffered = [rest], rest.num_rows
    if buffered:
        yield _finish_shard(shard, _concat(buffer, spec.path), position, spec)
    elif shard == 0:
        raise SourceError(f"input {spec.path!r} holds no rows")


def _concat(tables: list[pa.Table], where: str) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SourceError(f"input files disagree on column types (at {where!r}): {e}") from None


# Per-format readers: each yields tables with text columns url/caption (nulls allowed), the
# optional uid and keep columns, and the reserved reject columns for rows already known bad.

def _read_file(path: str, fmt: str, spec: SourceSpec) -> Iterator[pa.Table]:
    if os.path.getsize(path) == 0:
        raise SourceError(f"input file {path!r} is empty")
    if fmt == "parquet":
        yield from _read_parquet(path, spec)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, spec)
    else:
        yield from _read_delimited(path, spec, delimiter="\t" if fmt == "tsv" else ",")


def _read_parquet(path: str, spec: SourceSpec) -> Iterator[pa.Table]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise SourceError(f"input file {path!r} is not a readable parquet file: {e}") from None
    schema = parquet.schema_arrow
    url_col, caption_col = _resolve_columns(schema.names, spec, path)
    for name in (url_col, caption_col):
        type_ = schema.field(name).type
        if pa.types.is_dictionary(type_):
            type_ = type_.value_type
        if type_ not in _TEXT_TYPES:
            raise SourceError(
                f"column {name!r} of {path!r} has type {schema.field(name).type}; it must hold text"
            )
    wanted = _wanted_columns(url_col, caption_col, spec)
    for batch in parquet.iter_batches(batch_size=_CHUNK_ROWS, columns=wanted):
        yield _normalise(pa.Table.from_batches([batch]), url_col, caption_col, spec)


def _read_delimited(path: str, spec: SourceSpec, delimiter: str) -> Iterator[pa.Table]:
    csv = delimiter == ","  # TSV pools (img2dataset's) are unquoted: a stray quote is caption text
    parse = dict(delimiter=delimiter, newlines_in_values=csv, quote_char='"' if csv else False)
    try:
        probe_options = pacsv.ParseOptions(**parse, invalid_row_handler=lambda row: "skip")
        with pacsv.open_csv(path, parse_options=probe_options) as probe:
            names = probe.schema.names
    except pa.ArrowInvalid as e:
        raise SourceError(f"input file {path!r} cannot be parsed as {'csv' if csv else 'tsv'}: {e}") from None
    url_col, caption_col = _resolve_columns(names, spec, path)
    pending: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        number = row.number if row.number is not None and row.number > 0 else 1 << 62
        pending.append((number, f"csv row {row.number}: expected {row.expected_columns} columns, got "
                                f"{row.actual_columns}: {row.text[:200]!r}"))
        return "skip"

    types = {url_col: pa.binary(), caption_col: pa.binary()}
    if spec.uid_column:
        types[spec.uid_column] = pa.string()
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
        parse_options=pacsv.ParseOptions(**parse, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            include_columns=_wanted_columns(url_col, caption_col, spec), column_types=types
        ),
    )
    first_record = 0  # data records (valid or not) before the current batch
    empty = _empty_normalised(spec)
    with reader:
        for batch in reader:
            table = _normalise(pa.Table.from_batches([batch]), url_col, caption_col, spec)
            empty = table.schema.empty_table()
            # pyarrow numbers rows from 1 with the header as row 1: data record i is row i + 2.
            pending.sort()
            bad = []
            while pending and pending[0][0] - 2 < first_record + table.num_rows + len(bad):
                bad.append(pending.pop(0))
            yield _with_malformed(table, bad, first_record)
            first_record += table.num_rows + len(bad)
    if pending:
        yield _with_malformed(empty, sorted(pending), first_record)


def _read_jsonl(path: str, spec: SourceSpec) -> Iterator[pa.Table]:
    keys = _jsonl_keys(path)
    # With no JSON object in the first records, every line is malformed (or the file is blank).
    url_col, caption_col = _resolve_columns(keys, spec, path) if keys else (URL, CAPTION)
    columns: dict[str, list] = {}
    with _open_text_lines(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as e:
                _append_row(columns, spec, {}, url_col, caption_col, R.MALFORMED_ROW,
                            f"line {line_number}: {e}: {line[:200]!r}")
            else:
                reason, detail = _check_json_row(record, url_col, caption_col, spec.uid_column)
                _append_row(columns, spec, record, url_col, caption_col, reason, detail)
            if len(columns[URL]) >= _CHUNK_ROWS:
                yield _json_chunk(columns)
                columns = {}
    if columns:
        yield _json_chunk(columns)


def _open_text_lines(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _jsonl_keys(path: str, records: int = 1000) -> list[str]:
    """Keys seen in the first ``records`` objects of a JSONL file, in order of appearance."""
    keys: dict[str, None] = {}
    seen = 0
    with _open_text_lines(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                keys.update(dict.fromkeys(record))
                seen += 1
                if seen >= records:
                    break
    return list(keys)


def _check_json_row(record: dict, url_col: str, caption_col: str, uid_col: str | None):
    url, caption = record.get(url_col), record.get(caption_col)
    if url is None or url == "":
        return R.MISSING_URL, f"no value in column {url_col!r}"
    if not isinstance(url, str):
        return R.URL_NOT_TEXT, f"{url_col!r} holds a JSON {type(url).__name__}"
    if caption is None:
        return R.MISSING_CAPTION, f"no value in column {caption_col!r}"
    if not isinstance(caption, str):
        return R.CAPTION_NOT_TEXT, f"{caption_col!r} holds a JSON {type(caption).__name__}"
    for value, reason in ((url, R.URL_NOT_UTF8), (caption, R.CAPTION_NOT_UTF8)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return reason, f"unpaired surrogate escape: {e.reason}"
    if uid_col and record.get(uid_col) in (None, ""):
        return R.MISSING_UID, f"no value in column {uid_col!r}"
    return None, None


def _append_row(columns, spec, record, url_col, caption_col, reason, detail) -> None:
    """One JSONL row; a rejected row keeps whichever of its values are valid text."""
    def text(value):
        if not isinstance(value, str):
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return value

    columns.setdefault(URL, []).append(text(record.get(url_col)))
    columns.setdefault(CAPTION, []).append(text(record.get(caption_col)))
    if spec.uid_column:
        uid = record.get(spec.uid_column)
        columns.setdefault(UID, []).append(None if uid in (None, "") else str(uid))
    for name in spec.keep_columns:
        columns.setdefault(name, []).append(record.get(name))
    columns.setdefault(REJECT_REASON, []).append(reason)
    columns.setdefault(REJECT_DETAIL, []).append(detail)


def _json_chunk(columns: dict[str, list]) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed JSON types in a kept column
            arrays[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    for name in (URL, CAPTION, UID, REJECT_REASON, REJECT_DETAIL):
        if name in arrays:
            arrays[name] = arrays[name].cast(pa.string())
    return pa.table(arrays)


# Shared helpers ------------------------------------------------------------------------------

def _format_of(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return _EXTENSIONS.get(os.path.splitext(base)[1].lower())


def _resolve_columns(names: list[str], spec: SourceSpec, path: str) -> tuple[str, str]:
    url_col = _pick(names, spec.url_column, URL_CANDIDATES, "url_column", path)
    caption_col = _pick(names, spec.caption_column, CAPTION_CANDIDATES, "caption_column", path)
    for name in ([spec.uid_column] if spec.uid_column else []) + list(spec.keep_columns):
        if name not in names:
            raise SourceError(f"column {name!r} is not in {path!r}; its columns are {names}")
    return url_col, caption_col


def _pick(names, requested, candidates, key, path) -> str:
    if requested != "auto":
        if requested not in names:
            raise SourceError(f"{key} {requested!r} is not a column of {path!r}; its columns are {names}")
        return requested
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise SourceError(
        f"no {key.split('_')[0]} column found in {path!r} (looked for {', '.join(candidates)}); "
        f"its columns are {names}: set columns.{key.split('_')[0]} in the config"
    )


def _wanted_columns(url_col: str, caption_col: str, spec: SourceSpec) -> list[str]:
    wanted = [url_col, caption_col]
    for name in ([spec.uid_column] if spec.uid_column else []) + list(spec.keep_columns):
        if name not in wanted:
            wanted.append(name)
    return wanted


def _normalise(table: pa.Table, url_col: str, caption_col: str, spec: SourceSpec) -> pa.Table:
    """Typed url/caption/uid/keep columns plus reject columns for rows that are unusable."""
    n = table.num_rows
    reason = pa.nulls(n, pa.string())
    detail = pa.nulls(n, pa.string())

    def flag(mask, why, text):
        nonlocal reason, detail
        fresh = pc.and_(pc.fill_null(mask, False), pc.is_null(reason))
        reason = pc.if_else(fresh, pa.scalar(why), reason)
        detail = pc.if_else(fresh, pa.scalar(text), detail)

    url_values, caption_values = _decoded(table[url_col]), _decoded(table[caption_col])
    url, bad_url = _as_utf8(url_values)
    caption, bad_caption = _as_utf8(caption_values)
    flag(pc.or_kleene(pc.is_null(url_values), pc.equal(pc.binary_length(url_values.cast(pa.binary())), 0)),
         R.MISSING_URL, f"no value in column {url_col!r}")
    flag(bad_url, R.URL_NOT_UTF8, f"{url_col!r} is not valid UTF-8")
    flag(pc.is_null(caption_values), R.MISSING_CAPTION, f"no value in column {caption_col!r}")
    flag(bad_caption, R.CAPTION_NOT_UTF8, f"{caption_col!r} is not valid UTF-8")
    columns = {URL: url, CAPTION: caption}
    if spec.uid_column:
        uid = _decoded(table[spec.uid_column]).cast(pa.string())
        empty = pc.or_kleene(pc.is_null(uid), pc.equal(uid, ""))
        flag(empty, R.MISSING_UID, f"no value in column {spec.uid_column!r}")
        columns[UID] = pc.if_else(empty, pa.scalar(None, pa.string()), uid)
    for name in spec.keep_columns:
        columns[name] = table[name]
    columns[REJECT_REASON] = reason
    columns[REJECT_DETAIL] = detail
    return pa.table(columns)


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


def _empty_normalised(spec: SourceSpec) -> pa.Table:
    names = [URL, CAPTION] + ([UID] if spec.uid_column else []) + list(spec.keep_columns)
    return pa.table({n: pa.array([], pa.string()) for n in names + [REJECT_REASON, REJECT_DETAIL]})


def _with_malformed(table: pa.Table, bad_rows: list[tuple[int, str]], first_record: int) -> pa.Table:
    """``table`` with a reject row for each malformed record, placed at its input position."""
    if not bad_rows:
        return table
    n_bad, total = len(bad_rows), table.num_rows + len(bad_rows)
    extra = {name: pa.nulls(n_bad, table.schema.field(name).type) for name in table.column_names}
    extra[REJECT_REASON] = pa.array([R.MALFORMED_ROW] * n_bad, pa.string())
    extra[REJECT_DETAIL] = pa.array([text for _, text in bad_rows], pa.string())
    combined = pa.concat_tables([table, pa.table(extra, schema=table.schema)])
    bad_positions = [min(max(number - 2 - first_record, 0), total - 1) for number, _ in bad_rows]
    order = [-1] * total
    for k, position in enumerate(bad_positions):
        while order[position] != -1:  # unknown or clashing numbers: next free slot
            position = (position + 1) % total
        order[position] = table.num_rows + k
    valid = iter(range(table.num_rows))
    return combined.take([i if i != -1 else next(valid) for i in order])


def _finish_shard(shard: int, table: pa.Table, first_index: int, spec: SourceSpec) -> InputShard:
    n = table.num_rows
    index = pa.array(range(first_index, first_index + n), pa.int64())
    if not spec.uid_column:
        uid = _uids(index, pc.coalesce(table[URL], table[REJECT_DETAIL]), table[CAPTION])
    else:
        generated = _uids(index, pa.nulls(n, pa.string()), pa.nulls(n, pa.string()))
        uid = pc.coalesce(table[UID], generated)
    front = {UID: uid, SOURCE_INDEX: index, URL: table[URL], CAPTION: table[CAPTION]}
    rest = [name for name in table.column_names if name not in front]
    table = pa.table({**front, **{name: table[name] for name in rest}})
    rejected = pc.is_valid(table[REJECT_REASON])
    kept = table.filter(pc.invert(rejected)).drop_columns([REJECT_REASON, REJECT_DETAIL])
    bad = table.filter(rejected)
    counts = StageCounts(rows_in=n, rows_kept=kept.num_rows)
    for item in pc.value_counts(bad[REJECT_REASON]).to_pylist():
        counts.rejected[item["values"]] = item["counts"]
    rejects = reject_records(bad, READ_STAGE, shard) if bad.num_rows else None
    return InputShard(shard, kept, rejects, counts)


def _uids(index: pa.Array, url: pa.Array, caption: pa.Array) -> pa.Array:
    """Stable 128-bit ids from each row's position, url and caption (same across runs and runners).

    A rejected row without a url hashes its reject detail in the url's place.
    """
    keys = pc.binary_join_element_wise(pc.cast(index, pa.string()), pc.fill_null(url, ""),
                                       pc.fill_null(caption, ""), "\x1f")
    blake2b = hashlib.blake2b
    return pa.array([blake2b(k, digest_size=16).hexdigest() for k in keys.cast(pa.binary()).to_pylist()],
                    pa.string())


def check_keep_columns(keep: tuple[str, ...]) -> None:
    """Kept input columns must not collide with registered columns or reject-record fields."""
    reserved = set(COLUMNS) | {STAGE, REASON, DETAIL, SHARD, REJECT_REASON, REJECT_DETAIL}
    clash = [k for k in keep if k in reserved]
    if clash:
        raise SourceError(f"columns.keep names reserved column(s) {clash}; rename them in the input")
