"""Input files: finding them, telling their format, resolving columns, reading normalised chunks.

Every reader yields tables of one fixed schema: ``url`` and ``caption`` (UTF-8 text, null where
unusable), ``uid`` when the pool has its own, the kept columns, and the two reserved reject
columns set for rows already known bad (``malformed_row``, ``missing_url``, ``url_not_text``,
``url_not_utf8``, ``missing_caption``, ``caption_not_text``, ``caption_not_utf8``,
``missing_uid``). Problems with a whole file raise :class:`SourceError`.

Kept columns hold text for csv, tsv and jsonl (JSON values other than strings as JSON text); in
parquet they keep their type, unified over all input files, so every shard has one schema.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.stage import Rejections
from schemas import rejects as R
from schemas.columns import CAPTION, UID, URL
from schemas.rejects import REJECT_DETAIL, REJECT_REASON

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
    ``keep_columns`` are carried through.
    """

    path: str
    format: str = "auto"
    url_column: str = "auto"
    caption_column: str = "auto"
    uid_column: str | None = None
    keep_columns: tuple[str, ...] = field(default_factory=tuple)


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


def check_file(path: str, fmt: str, spec: SourceSpec) -> tuple[str, str]:
    """Resolve the url and caption columns of ``path`` and check what can be checked cheaply."""
    if os.path.getsize(path) == 0:
        raise SourceError(f"input file {path!r} is empty")
    if fmt == "parquet":
        schema = _parquet(path).schema_arrow
        url_col, caption_col = resolve_columns(schema.names, spec, path)
        for name, key in ((url_col, "columns.url"), (caption_col, "columns.caption")):
            type_ = schema.field(name).type
            if (type_.value_type if pa.types.is_dictionary(type_) else type_) not in _TEXT_TYPES:
                raise SourceError(f"{key}: column {name!r} of {path!r} has type {type_}; it must hold text")
        return url_col, caption_col
    if fmt == "jsonl":
        keys = _jsonl_keys(path)
        # No JSON object among the first records: every line is malformed (or the file is blank).
        return resolve_columns(keys, spec, path) if keys else (URL, CAPTION)
    return resolve_columns(_delimited_header(path, fmt), spec, path)


def keep_types(files: list[str], fmt: str, spec: SourceSpec) -> dict[str, pa.DataType]:
    """The type of each kept column in every shard: text, or (parquet) unified over all files."""
    if fmt != "parquet" or not spec.keep_columns:
        return {name: pa.string() for name in spec.keep_columns}
    schemas = [pa.schema([_parquet(f).schema_arrow.field(n) for n in spec.keep_columns]) for f in files]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SourceError(f"input files disagree on the types of kept columns {list(spec.keep_columns)}: {e}") \
            from None
    return {f.name: f.type for f in unified}


def read_file(path: str, fmt: str, spec: SourceSpec, kept: dict[str, pa.DataType]) -> Iterator[pa.Table]:
    """Normalised chunks of one input file (see the module docstring)."""
    url_col, caption_col = check_file(path, fmt, spec)
    if fmt == "parquet":
        chunks = _read_parquet(path, spec, url_col, caption_col)
    elif fmt == "jsonl":
        chunks = _read_jsonl(path, spec, url_col, caption_col)
    else:
        chunks = _read_delimited(path, fmt, spec, url_col, caption_col)
    for chunk in chunks:
        yield chunk.cast(_schema(spec, kept))


def caption_texts(path: str, column: str = "auto") -> list[str]:
    """Just the captions of a file (any pool format, or .txt with one caption a line), for mining."""
    import polars as pl

    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    fmt = detect_format([path])
    frame = {"parquet": lambda: pl.read_parquet(path), "jsonl": lambda: pl.read_ndjson(path),
             "csv": lambda: pl.read_csv(path, infer_schema=False),
             "tsv": lambda: pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)}[fmt]()
    name = _pick(frame.columns, column, CAPTION_CANDIDATES, "caption column", path)
    return [text for text in frame[name].to_list() if isinstance(text, str)]


def resolve_columns(names: list[str], spec: SourceSpec, path: str) -> tuple[str, str]:
    url_col = _pick(names, spec.url_column, URL_CANDIDATES, "columns.url", path)
    caption_col = _pick(names, spec.caption_column, CAPTION_CANDIDATES, "columns.caption", path)
    for name, key in [(spec.uid_column, "columns.uid")] + [(k, "columns.keep") for k in spec.keep_columns]:
        if name and name not in names:
            raise SourceError(f"{key}: column {name!r} is not in {path!r}; its columns are {names}")
    return url_col, caption_col


# Formats ---------------------------------------------------------------------------------------

def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise SourceError(f"input file {path!r} is not a readable parquet file: {e}") from None


def _read_parquet(path: str, spec: SourceSpec, url_col: str, caption_col: str) -> Iterator[pa.Table]:
    columns = _wanted_columns(url_col, caption_col, spec)
    for batch in _parquet(path).iter_batches(batch_size=_CHUNK_ROWS, columns=columns):
        yield _normalise(pa.Table.from_batches([batch]), url_col, caption_col, spec)


def _delimited_options(fmt: str) -> dict:
    csv = fmt == "csv"  # TSV pools (img2dataset's) are unquoted: a stray quote is caption text
    return dict(delimiter="," if csv else "\t", newlines_in_values=csv, quote_char='"' if csv else False)


def _delimited_header(path: str, fmt: str) -> list[str]:
    try:
        options = pacsv.ParseOptions(**_delimited_options(fmt), invalid_row_handler=lambda row: "skip")
        with pacsv.open_csv(path, parse_options=options) as probe:
            return probe.schema.names
    except pa.ArrowInvalid as e:
        raise SourceError(f"input file {path!r} cannot be parsed as {fmt}: {e}") from None


def _read_delimited(path: str, fmt: str, spec: SourceSpec, url_col: str, caption_col: str) -> Iterator[pa.Table]:
    pending: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        number = row.number if row.number is not None and row.number > 0 else 1 << 62
        pending.append((number, f"csv row {row.number}: expected {row.expected_columns} columns, got "
                                f"{row.actual_columns}: {row.text[:200]!r}"))
        return "skip"

    types = {url_col: pa.binary(), caption_col: pa.binary(), **{k: pa.string() for k in spec.keep_columns}}
    if spec.uid_column:
        types[spec.uid_column] = pa.string()
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
        parse_options=pacsv.ParseOptions(**_delimited_options(fmt), invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(include_columns=_wanted_columns(url_col, caption_col, spec),
                                             column_types=types),
    )
    first_record = 0  # data records (valid or not) before the current batch
    empty = None
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
        if empty is None:
            empty = pa.table({n: pa.array([], pa.string()) for n in _schema(spec, {}).names})
        yield _with_malformed(empty, sorted(pending), first_record)


def _read_jsonl(path: str, spec: SourceSpec, url_col: str, caption_col: str) -> Iterator[pa.Table]:
    columns: dict[str, list] = {}
    with _open_binary(path) as f:
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
                yield pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
                columns = {}
    if columns:
        yield pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _jsonl_keys(path: str, records: int = 1000) -> list[str]:
    """Keys seen in the first ``records`` objects of a JSONL file, in order of appearance."""
    keys: dict[str, None] = {}
    seen = 0
    with _open_binary(path) as f:
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
        if _text(value) is None:
            return reason, "unpaired surrogate escape"
    if uid_col and record.get(uid_col) in (None, ""):
        return R.MISSING_UID, f"no value in column {uid_col!r}"
    return None, None


def _text(value) -> str | None:
    """``value`` if it is a string that encodes as UTF-8, else ``None``."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _append_row(columns, spec, record, url_col, caption_col, reason, detail) -> None:
    """One JSONL row; a rejected row keeps whichever of its values are valid text."""
    columns.setdefault(URL, []).append(_text(record.get(url_col)))
    columns.setdefault(CAPTION, []).append(_text(record.get(caption_col)))
    if spec.uid_column:
        uid = record.get(spec.uid_column)
        columns.setdefault(UID, []).append(None if uid in (None, "") else str(uid))
    for name in spec.keep_columns:
        value = record.get(name)
        columns.setdefault(name, []).append(value if value is None or isinstance(value, str) else json.dumps(value))
    columns.setdefault(REJECT_REASON, []).append(reason)
    columns.setdefault(REJECT_DETAIL, []).append(detail)


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
    return list(dict.fromkeys([url_col, caption_col, *([spec.uid_column] if spec.uid_column else []),
                               *spec.keep_columns]))


def _schema(spec: SourceSpec, kept: dict[str, pa.DataType]) -> pa.Schema:
    fields = [pa.field(URL, pa.string()), pa.field(CAPTION, pa.string())]
    if spec.uid_column:
        fields.append(pa.field(UID, pa.string()))
    fields += [pa.field(name, kept.get(name, pa.string())) for name in spec.keep_columns]
    return pa.schema(fields + [pa.field(REJECT_REASON, pa.string()), pa.field(REJECT_DETAIL, pa.string())])


def _normalise(table: pa.Table, url_col: str, caption_col: str, spec: SourceSpec) -> pa.Table:
    """Typed url/caption/uid/keep columns plus reject columns for rows that are unusable."""
    rejections = Rejections(table.num_rows)
    url_values, caption_values = _decoded(table[url_col]), _decoded(table[caption_col])
    url, bad_url = _as_utf8(url_values)
    caption, bad_caption = _as_utf8(caption_values)
    empty_url = pc.equal(pc.binary_length(url_values.cast(pa.binary())), 0)
    rejections.add(pc.or_kleene(pc.is_null(url_values), empty_url), R.MISSING_URL, f"no value in column {url_col!r}")
    rejections.add(bad_url, R.URL_NOT_UTF8, f"{url_col!r} is not valid UTF-8")
    rejections.add(pc.is_null(caption_values), R.MISSING_CAPTION, f"no value in column {caption_col!r}")
    rejections.add(bad_caption, R.CAPTION_NOT_UTF8, f"{caption_col!r} is not valid UTF-8")
    columns = {URL: url, CAPTION: caption}
    if spec.uid_column:
        uid = _decoded(table[spec.uid_column]).cast(pa.string())
        empty = pc.or_kleene(pc.is_null(uid), pc.equal(uid, ""))
        rejections.add(empty, R.MISSING_UID, f"no value in column {spec.uid_column!r}")
        columns[UID] = pc.if_else(empty, pa.scalar(None, pa.string()), uid)
    for name in spec.keep_columns:
        columns[name] = table[name]
    table = pa.table(columns)
    if not rejections.any:  # keep the schema fixed: the reject columns are always there
        return table.append_column(REJECT_REASON, pa.nulls(table.num_rows, pa.string())) \
            .append_column(REJECT_DETAIL, pa.nulls(table.num_rows, pa.string()))
    return rejections.attach(table)


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
