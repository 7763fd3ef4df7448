"""Tests of pipelines/source/text_records.py (records of bounded size, every line accounted for) and of
reading hostile files in bounded memory."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from pipelines.source.shards import SourceSpec, read_shards
from pipelines.source.text_chunk import CSV, JSONL, TSV, Dialect
from pipelines.source.text_records import RecordReader, Reject
from tests.conftest import REPO_ROOT

MiB = 1 << 20


def split(path: Path, dialect: Dialect, limit: int, chunk_bytes: int, fields: int | None = None):
    """The header, and ``(first line, record bytes)`` or ``(line, reject detail)`` for everything after it."""
    with RecordReader(str(path), dialect, limit, chunk_bytes=chunk_bytes) as reader:
        header = reader.header() if dialect is not JSONL else None
        items = []
        for batch in reader.batches(fields):
            for run in batch.runs():
                if isinstance(run, Reject):
                    assert run.reason == "malformed_row"
                    items.append((int(re.search(r"line (\d+)", run.detail).group(1)), run.detail))
                    continue
                items += [
                    (int(batch.lines[k]), bytes(batch.data[batch.starts[k] : batch.stops[k]])) for k in range(*run)
                ]
    return header, items


def line_ends(dialect: Dialect) -> re.Pattern:
    return re.compile(rb"\r\n|\r|\n" if dialect.lone_cr else rb"\n")


# Every line is one record or one reject ---------------------------------------------------------

TOKENS = [b"a", b"b", b",", b"\t", b'"', b'""', b"\n", b"\r", b"\r\n", b"xyz"]
WEIGHTS = [6, 6, 3, 1, 2, 1, 3, 0.5, 0.5, 2]


def random_body(rng: random.Random) -> bytes:
    return b"".join(rng.choices(TOKENS, WEIGHTS, k=rng.randint(0, 70)))


@pytest.mark.parametrize("dialect", [CSV, TSV, JSONL], ids=["csv", "tsv", "jsonl"])
def test_every_line_is_in_one_record_or_one_reject(tmp_path, dialect):
    rng = random.Random(7)
    ends = line_ends(dialect)
    for _ in range(300):
        data = (b"" if dialect is JSONL else b"h1,h2\n") + random_body(rng)
        path = tmp_path / "p.txt"
        path.write_bytes(data)
        limit = rng.choice([8, 16, 1000])
        lines = ends.split(data)
        if lines[-1] == b"":
            lines.pop()  # nothing after the last line end
        covered = {1} if dialect is not JSONL else set()
        for chunk_bytes in (1, 3, 64):
            _, items = split(path, dialect, limit, chunk_bytes, fields=2)
            spans = [(line, line + (1 if isinstance(item, str) else len(ends.findall(item)))) for line, item in items]
            assert all(a < b for a, b in spans)
            assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:])), (data, items)
            found = covered | {n for a, b in spans for n in range(a, b)}
            # A line that is in no record and no reject is empty (and no row, as pyarrow has it).
            assert all(lines[n - 1] == b"" for n in range(1, len(lines) + 1) if n not in found), (data, items)
            if chunk_bytes == 1:
                first = items
            assert items == first, data  # the same, however the file is cut into chunks


def pyarrow_rows(data: bytes) -> int:
    """How many rows (valid or not) pyarrow reads from a whole csv file with a header h1,h2."""
    invalid = []
    table = pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(block_size=MiB),
        parse_options=pacsv.ParseOptions(
            newlines_in_values=True, invalid_row_handler=lambda row: invalid.append(row) or "skip"
        ),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(["h1", "h2"], pa.binary())),
    )
    return table.num_rows + len(invalid)


def test_records_are_pyarrows_rows_when_nothing_is_rejected(tmp_path):
    rng = random.Random(11)
    compared = 0
    for _ in range(400):
        data = b"h1,h2\n" + random_body(rng)
        path = tmp_path / "p.csv"
        path.write_bytes(data)
        _, items = split(path, CSV, 1000, 5, fields=2)
        if not any(isinstance(item, str) for _, item in items):
            assert len(items) == pyarrow_rows(data), data
            compared += 1
    assert compared > 100


def test_quoted_record_over_the_limit_costs_its_first_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'url,caption\nhttp://127.0.0.1/a,"x\n' + b"x\n" * 100 + b'"\nhttp://127.0.0.1/b,ok\n')
    _, items = split(path, CSV, 100, 16, fields=2)
    first, *middle, closing, last = items
    assert first[0] == 2 and first[1].startswith(
        "csv line 2: a quoted record over several lines, longer than the row limit of 100 bytes "
        "(input_max_row_bytes) (an unterminated quote?): 'http://127.0.0.1/a,\"x'"
    )
    assert middle == [(n, b"x\n") for n in range(3, 103)]  # read again, one record a line
    assert closing[0] == 103 and closing[1].startswith(
        "csv line 103: unterminated quote (still open at the end of the file)"
    )
    assert last == (104, b"http://127.0.0.1/b,ok\n")


def test_over_long_line_is_skipped_across_chunks(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"y" * 5000 + b'\r\n{"b": 2}\n')
    _, items = split(path, JSONL, 100, 64)
    assert [line for line, _ in items] == [1, 2, 3]
    assert items[1][1].startswith("line 2: longer than the row limit of 100 bytes")
    assert items[2][1] == b'{"b": 2}\n'


def test_lines_of_lone_quotes_cost_one_reject_each(tmp_path):
    # More rejects than one batch holds: each line opens a quote that the next one closes.
    path = tmp_path / "p.csv"
    path.write_bytes(b"url,caption\n" + b'"\n' * 70_000)
    shards = list(read_shards(SourceSpec(str(path)), 50_000))
    assert [s.counts.rows_in for s in shards] == [50_000, 20_000]
    assert all(s.counts.closes and s.counts.rejected == {"malformed_row": s.counts.rows_in} for s in shards)


# Hostile files in bounded memory ---------------------------------------------------------------

# The child's own peak: VmHWM belongs to the process image (ru_maxrss would carry over the parent's,
# forked before the exec).
_READ_IN_CHILD = """
import json, re, sys
from pipelines.source.shards import SourceSpec, read_shards
kept, rejected = 0, {}
for shard in read_shards(SourceSpec(sys.argv[1]), 1000):
    kept += shard.counts.rows_kept
    for reason, n in shard.counts.rejected.items():
        rejected[reason] = rejected.get(reason, 0) + n
with open("/proc/self/status") as f:
    peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
print(json.dumps({"kept": kept, "rejected": rejected, "peak_mib": peak_kib / 1024}))
"""

HUGE_MIB = 384  # holding the line once would take the reading process past the bound below
PEAK_BOUND_MIB = 320  # about 180 MiB are needed: the interpreter, pyarrow and a few chunks


def gzip_file(path: Path, parts) -> Path:
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        for part in parts:
            f.write(packer.compress(part))
        f.write(packer.flush())
    return path


def huge(fill: bytes):
    block = fill * MiB
    return (block for _ in range(HUGE_MIB))


def read_in_child(path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _READ_IN_CHILD, str(path)], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_huge_jsonl_line_is_rejected_in_bounded_memory(tmp_path):
    path = gzip_file(
        tmp_path / "p.jsonl.gz",
        [
            b'{"url": "http://a.test/1", "caption": "one"}\n',
            b'{"url": "http://a.test/2", "caption": "',
            *huge(b"x"),
            b'"}\n',
            b'{"url": "http://a.test/3", "caption": "three"}\n',
        ],
    )
    result = read_in_child(path)
    assert (result["kept"], result["rejected"]) == (2, {"malformed_row": 1})
    assert result["peak_mib"] < PEAK_BOUND_MIB


def test_huge_csv_field_is_rejected_in_bounded_memory(tmp_path):
    path = gzip_file(
        tmp_path / "p.csv.gz",
        [b'url,caption\nhttp://a.test/1,one\nhttp://a.test/2,"', *huge(b"x"), b'"\nhttp://a.test/3,three\n'],
    )
    result = read_in_child(path)
    assert (result["kept"], result["rejected"]) == (2, {"malformed_row": 1})
    assert result["peak_mib"] < PEAK_BOUND_MIB
