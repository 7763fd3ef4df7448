"""Splitting csv, tsv and jsonl files into records of bounded size, every line accounted for.

A record is the text of one input row: one physical line in tsv and jsonl; in csv one line, or
several when a quoted field holds line ends, split exactly where pyarrow's CSV parser splits (a
quote opens a field only at the field's start, ``""`` inside quotes is a quote, and ``\\n``,
``\\r\\n`` or a lone ``\\r`` ends a line). Empty lines are no records. The file is read in chunks
of :data:`CHUNK_BYTES`, decompressed by its extension (``.gz``, ``.bz2``, ``.zst``, …); a chunk
and at most about twice ``max_row_bytes`` are held at a time, so each record reaches its parser
whole, and a batch holds at most 65536 records and rejects.

Every physical line belongs to exactly one record or one reject (``malformed_row``):

* a line longer than ``max_row_bytes`` is rejected and skipped without being held whole;
* a csv record whose quote is still open at the end of the file, or that runs over several lines
  past ``max_row_bytes``, has an unterminated quote: its first line is rejected and reading
  resumes at the next line;
* a csv record over several lines with the wrong number of fields, or with text after a closing
  quote, likewise costs only its first line, where a stray quote joined the lines after it.

When the file itself cannot be read on (a truncated or corrupt compressed file), the rest of it
is one ``unreadable_input`` reject naming the last line read; the records before it are kept.

Vectorised on numpy: quote parity at each line end finds the record ends; a record whose quotes
pyarrow reads differently (a quote inside an unquoted field), or that breaks a rule above, is
walked quote by quote.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from schemas import rejects as R

CHUNK_BYTES = 4 << 20
_BATCH_ITEMS = 1 << 16  # records and rejects in one batch, whatever the lines are like
_READ_BYTES = 1 << 16
#: The config key that sets ``max_row_bytes``, named in reject details.
MAX_ROW_BYTES_KEY = "input_max_row_bytes"

_LF, _CR, _QUOTE = ord("\n"), ord("\r"), ord('"')
_NONE = np.empty(0, np.int64)
_PREVIEW = 200


@dataclass(frozen=True)
class Dialect:
    """How a text format delimits records: csv quotes fields; csv and tsv end lines at a lone ``\\r`` too."""

    label: str  # how reject details name a line: "csv line 3"
    delimiter: bytes = b","
    quoting: bool = False
    lone_cr: bool = True


CSV = Dialect("csv line", b",", quoting=True)
TSV = Dialect("tsv line", b"\t")
JSONL = Dialect("line", lone_cr=False)


@dataclass(frozen=True)
class Reject:
    """A line (or the unreadable rest of a file) that is no record, after ``slot`` records of its batch."""

    slot: int
    reason: str
    detail: str


@dataclass
class RecordBatch:
    """Consecutive records of one chunk, in input order, and the rejects among them."""

    data: bytearray
    starts: np.ndarray  # offsets of the records in data
    stops: np.ndarray  # just past each record's line end
    lines: np.ndarray  # line number in the file of each record's first line
    rejects: list[Reject]

    def __len__(self) -> int:
        return len(self.starts) + len(self.rejects)

    def runs(self) -> Iterator[tuple[int, int] | Reject]:
        """In input order, each :class:`Reject` and each run of records between them as ``(first, stop)``."""
        first = 0
        for reject in [*self.rejects, None]:
            stop = len(self.starts) if reject is None else reject.slot
            if stop > first:
                yield first, stop
                first = stop
            if reject is not None:
                yield reject

    def run_text(self, first: int, stop: int) -> memoryview:
        """The bytes of records ``first`` to ``stop`` (exclusive); only empty lines lie between them."""
        return memoryview(self.data)[self.starts[first] : self.stops[stop - 1]]

    def text(self, first: int = 0, stop: int | None = None) -> pa.Buffer:
        """The bytes of records ``first`` to ``stop`` (exclusive; all by default), in order."""
        stop = len(self.starts) if stop is None else stop
        runs = [
            self.run_text(max(a, first), min(b, stop))
            for a, b in (run for run in self.runs() if not isinstance(run, Reject))
            if a < stop and b > first
        ]
        return pa.py_buffer(runs[0] if len(runs) == 1 else b"".join(runs))


class RecordReader:
    """Reads one file as records of at most ``max_row_bytes`` bytes (see the module docstring)."""

    def __init__(self, path: str, dialect: Dialect, max_row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.path, self.dialect, self.limit, self.chunk_bytes = path, dialect, max_row_bytes, chunk_bytes
        self.failure: Exception | None = None  # why the file could not be read to its end
        self.lines_read = 0  # line ends consumed so far
        self._stream = pa.input_stream(path)
        self._carry = b""
        self._full = False  # the carry holds more than one unfinished record: split it before reading on
        self._done = False
        self._skipping = False  # inside an over-long line, dropping bytes up to its end
        self._scratch = np.empty(0, dtype=bool)

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()

    def header(self) -> bytes | None:
        """The first record (a header line), or None for a file of empty lines.

        Raises :class:`ValueError` saying why when the header is too long, never closes its quote
        or cannot be read.
        """
        while True:
            chunk = self._next_chunk()
            start = chunk.skip_empty_lines(0)
            self._consume(chunk, start)
            if start == len(chunk.data) and self._done:
                if self.failure is not None:
                    raise ValueError(f"cannot be read: {self.failure}")
                return None
            outcome = chunk.settle(start, None, self.limit)
            if isinstance(outcome, int):
                self._consume(chunk, outcome, start)
                return bytes(chunk.data[start:outcome]).rstrip(b"\r\n")
            if isinstance(outcome, _Rejected):
                raise ValueError(f"line {self.lines_read + 1} (its header): {outcome.why}")
            if self.failure is not None:
                raise ValueError(f"cannot be read past line {self.lines_read}: {self.failure}")

    def batches(self, fields: int | None = None) -> Iterator[RecordBatch]:
        """The records of the rest of the file, a chunk at a time.

        ``fields``, when known (csv: the header's), is the number of fields a record over several
        lines must have to be taken as one. Each batch is split in a worker thread while the caller
        works on the one before (numpy, pyarrow and file reads let go of the GIL).
        """
        with ThreadPoolExecutor(max_workers=1) as worker:
            batches = self._batches(fields)
            pending = worker.submit(next, batches, None)
            while (batch := pending.result()) is not None:
                pending = worker.submit(next, batches, None)
                yield batch

    def _batches(self, fields: int | None) -> Iterator[RecordBatch]:
        while True:
            batch = self._split(self._next_chunk(), fields)
            finished = self._done and not self._full
            if finished and self.failure is not None:
                batch.rejects.append(
                    Reject(
                        len(batch.starts),
                        R.UNREADABLE_INPUT,
                        f"input file {self.path!r} is unreadable after line {self.lines_read} "
                        f"(the rest of it is lost): {self.failure}",
                    )
                )
            if len(batch):
                yield batch
            if finished:
                return

    def _next_chunk(self) -> _Chunk:
        kept = len(self._carry)
        reading = not (self._done or self._full)
        # A long unfinished record reads more at once: each byte is scanned a bounded number of times.
        data = bytearray(kept + (max(self.chunk_bytes, kept) if reading else 0))
        data[:kept] = self._carry
        if reading:
            got = self._read_into(memoryview(data)[kept:])
            del data[kept + got :]
        if len(self._scratch) < len(data) + 1:
            self._scratch = np.empty(2 * len(data) + 1, dtype=bool)
        return _Chunk(data, self.dialect, final=self._done and self.failure is None, scratch=self._scratch)

    def _read_into(self, view: memoryview) -> int:
        """Fill ``view`` from the file; the bytes it can give are kept when it fails on the way."""
        got = 0
        try:
            while got < len(view):
                # In small pieces: a read that fails (a truncated gzip) loses what it had decompressed.
                more = self._stream.readinto(view[got : got + _READ_BYTES])
                if not more:
                    self._done = True
                    break
                got += more
        except (OSError, pa.ArrowException) as e:
            # Without its traceback, which would hold on to ``view`` and keep the chunk from being cut to size.
            self.failure, self._done = e.with_traceback(None), True
        return got

    def _consume(self, chunk: _Chunk, upto: int, start: int = 0) -> None:
        """Count the line ends from ``start`` to ``upto`` as read; keep what follows for the next chunk."""
        self.lines_read += chunk.line_index(upto) - chunk.line_index(start)
        self._carry = chunk.data[upto:]

    def _split(self, chunk: _Chunk, fields: int | None) -> RecordBatch:
        """The records and rejects of ``chunk``; an unfinished last record is kept for the next chunk."""
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # starts, stops, first line indices
        rejects: list[Reject] = []
        count = 0
        pos = chunk.end_of_skipped_line() if self._skipping else 0
        self._skipping = pos is None
        pos = chunk.tail_start() if pos is None else pos
        while not self._skipping and pos < len(chunk.data) and count + len(rejects) < _BATCH_ITEMS:
            most = _BATCH_ITEMS - count - len(rejects)
            *records, pos, problem = chunk.records_from(pos, fields, self.limit, most)
            found.append(records)
            count += len(records[0])
            if len(records[0]) == most:
                break
            room = len(chunk.data) - pos
            if not room or (not problem and not chunk.final and room <= self.limit):
                break
            outcome = chunk.settle(pos, fields, self.limit)
            if outcome is None:  # the record goes on in the next chunk
                break
            line_index = chunk.line_index(pos)
            if isinstance(outcome, int):
                found.append((np.array([pos]), np.array([outcome]), np.array([line_index])))
                count += 1
                pos = outcome
                continue
            rejects.append(
                Reject(
                    count, R.MALFORMED_ROW, f"{self.dialect.label} {self.lines_read + line_index + 1}: {outcome.why}"
                )
            )
            self._skipping = outcome.resume is None
            pos = chunk.tail_start() if outcome.resume is None else outcome.resume
        self._full = count + len(rejects) >= _BATCH_ITEMS and pos < len(chunk.data)
        batch = _batch(chunk, found, rejects)
        batch.lines += self.lines_read + 1
        self._consume(chunk, pos)
        return batch


def _batch(chunk: _Chunk, found: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rejects: list[Reject]) -> RecordBatch:
    """The non-empty records found, with each reject's slot counted in non-empty records."""
    starts, stops, lines = (np.concatenate(part) for part in zip(*found)) if found else (_NONE, _NONE, _NONE)
    empty = chunk.is_empty(starts, stops)
    if empty.any():
        kept_before = np.concatenate([[0], np.cumsum(~empty)])
        rejects = [Reject(int(kept_before[r.slot]), r.reason, r.detail) for r in rejects]
        starts, stops, lines = starts[~empty], stops[~empty], lines[~empty]
    return RecordBatch(chunk.data, starts, stops, lines, rejects)


@dataclass(frozen=True)
class _Rejected:
    """Why the first line of a record is rejected, and where reading resumes (None: past the end of
    an over-long line that goes on beyond the chunk)."""

    resume: int | None
    why: str


@dataclass
class _Parity:
    """Record ends for records that start after an even (or odd) number of the chunk's quotes."""

    ends: np.ndarray  # positions of the line ends that end a record
    line_index: np.ndarray  # their indices in the chunk's line ends
    problems: np.ndarray  # j where the record after ends[j - 1] is too long or has the wrong fields
    unquoted: np.ndarray  # quotes that would open a field but stand inside an unquoted one (text to pyarrow)

    @functools.cached_property
    def problem_set(self) -> set[int]:
        return set(self.problems.tolist())


class _Chunk:
    """One chunk of the file (with whatever the last one left unfinished) and its line ends and quotes."""

    def __init__(self, data: bytearray, dialect: Dialect, final: bool, scratch: np.ndarray) -> None:
        if final and data and not data.endswith(b"\n") and not (dialect.lone_cr and data.endswith(b"\r")):
            data += b"\n"  # the last line needs no line end
        self.data, self.dialect, self.final = data, dialect, final
        self._closing = {dialect.delimiter[0], _LF, _CR, _QUOTE}  # what may follow a quote that closes a field
        self.bytes = np.frombuffer(data, np.uint8)
        self._scratch = scratch[: len(data)]
        self.line_ends = self._find_line_ends()
        self.quotes = self._positions(_QUOTE) if dialect.quoting and b'"' in data else _NONE
        self._quote_parity: np.ndarray | None = None
        self._parities: dict[tuple[int, int | None], _Parity] = {}

    def _positions(self, byte: int) -> np.ndarray:
        # Into a reused mask: a fresh one per chunk costs more in page faults than the comparison.
        return np.flatnonzero(np.equal(self.bytes, byte, out=self._scratch))

    def _find_line_ends(self) -> np.ndarray:
        ends = self._positions(_LF)
        if not self.dialect.lone_cr or b"\r" not in self.data:
            return ends
        cr = self._positions(_CR)
        after = cr + 1
        known = after < len(self.bytes)  # a \r that ends the chunk may yet be followed by \n
        lone = cr[known][self.bytes[after[known]] != _LF]
        if self.final and not known[-1]:
            lone = np.append(lone, cr[-1])
        return np.sort(np.concatenate([ends, lone]))

    def is_line_end(self, positions: np.ndarray) -> np.ndarray:
        found = self.bytes[positions]
        return (found == _LF) | ((found == _CR) if self.dialect.lone_cr else False)

    def is_empty(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Which records are empty lines (pyarrow skips them; they are no rows)."""
        empty = np.zeros(len(starts), dtype=bool)
        short = np.flatnonzero(stops - starts <= 2)  # no more than a line end
        empty[short] = self.is_line_end(starts[short])
        return empty

    def line_index(self, pos: int) -> int:
        """How many lines of the chunk end before ``pos``."""
        return int(self.line_ends.searchsorted(pos))

    def next_line_end(self, pos: int) -> int | None:
        i = self.line_index(pos)
        return int(self.line_ends[i]) if i < len(self.line_ends) else None

    def skip_empty_lines(self, pos: int) -> int:
        """The start of the first line from ``pos`` that is not empty (or of what follows the last line end)."""
        starts = np.concatenate([[pos], self.line_ends[self.line_index(pos) :] + 1])
        starts = starts[starts < len(self.data)]
        filled = np.flatnonzero(~self.is_line_end(starts))
        if len(filled):
            return int(starts[filled[0]])
        return int(self.line_ends[-1]) + 1 if len(self.line_ends) and self.line_ends[-1] >= pos else pos

    def tail_start(self) -> int:
        """Where to stop when dropping the rest of the chunk: before a final \\r whose \\n may follow."""
        trailing_cr = self.dialect.lone_cr and not self.final and self.data.endswith(b"\r")
        return len(self.data) - trailing_cr

    def end_of_skipped_line(self) -> int | None:
        """Just past the line end that ends an over-long line begun in an earlier chunk (None: not here)."""
        end = self.next_line_end(0)
        return None if end is None else end + 1

    # Records by quote parity ---------------------------------------------------------------

    def records_from(
        self, pos: int, fields: int | None, limit: int, most: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
        """Up to ``most`` records from ``pos``, up to the first that needs a closer look (:meth:`settle`).

        Returns their starts, stops and first line indices, where the next record starts, and
        whether that record needs the closer look (False: it is the unfinished rest of the chunk).
        """
        parity = self._parity(int(self.quotes.searchsorted(pos)) & 1, fields, limit)
        first = int(parity.ends.searchsorted(pos))
        stop = len(parity.ends)
        if first < stop and self._is_problem(parity, first, pos, fields, limit):
            stop = first
        later = int(parity.problems.searchsorted(first, side="right"))
        if later < len(parity.problems):
            stop = min(stop, int(parity.problems[later]))
        unquoted = int(parity.unquoted.searchsorted(pos))
        problem = stop < len(parity.ends) or unquoted < len(parity.unquoted)
        if unquoted < len(parity.unquoted):
            stop = min(stop, int(parity.ends.searchsorted(parity.unquoted[unquoted])))
        ends = parity.ends[first : min(stop, first + most)]
        if not len(ends):
            return _NONE, _NONE, _NONE, pos, problem
        starts = np.concatenate([[pos], ends[:-1] + 1])
        lines = np.concatenate([[self.line_index(pos)], parity.line_index[first : first + len(ends) - 1] + 1])
        return starts, ends + 1, lines, int(ends[-1]) + 1, problem

    def _parity(self, odd: int, fields: int | None, limit: int) -> _Parity:
        key = (odd, fields)
        if key not in self._parities:
            self._parities[key] = self._build_parity(odd, fields, limit)
        return self._parities[key]

    def _build_parity(self, odd: int, fields: int | None, limit: int) -> _Parity:
        if not len(self.quotes):
            line_index = np.arange(len(self.line_ends))
            unquoted = _NONE
        else:
            if self._quote_parity is None:
                self._quote_parity = np.searchsorted(self.quotes, self.line_ends) & 1
            line_index = np.flatnonzero(self._quote_parity == odd)
            opening = self.quotes[odd::2]
            before = self.bytes[opening - 1]
            at_field_start = (
                (before == self.dialect.delimiter[0])
                | (before == _LF)
                | (before == _CR)
                | (before == _QUOTE)
                | (opening == 0)
            )  # after a quote: the second of a doubled ""
            unquoted = opening[~at_field_start]
        ends = self.line_ends[line_index]
        long = np.flatnonzero(np.diff(ends) - 1 > limit) + 1
        problems = long
        if fields is not None and len(self.quotes):
            several = np.flatnonzero(np.diff(line_index) > 1) + 1
            wrong = [j for j in several.tolist() if self._shape(int(ends[j - 1]) + 1, int(ends[j])) != (fields, False)]
            problems = np.unique(np.concatenate([long, np.array(wrong, np.int64)]))
        return _Parity(ends, line_index, problems, unquoted)

    def _is_problem(self, parity: _Parity, first: int, start: int, fields: int | None, limit: int) -> bool:
        """Whether the record from ``start`` to ``parity.ends[first]`` needs a closer look."""
        end = int(parity.ends[first])
        if first and parity.ends[first - 1] + 1 == start:  # the record found for the whole chunk
            return first in parity.problem_set
        if end - start > limit:
            return True
        several_lines = parity.line_index[first] > self.line_index(start)
        return several_lines and fields is not None and self._shape(start, end) != (fields, False)

    def _shape(self, start: int, end: int) -> tuple[int, bool]:
        """The fields of a record whose quotes all open at a field start and close in the record, and
        whether text follows a closing quote (which pyarrow allows, but no csv writer does)."""
        inside = self.quotes[self.quotes.searchsorted(start) : self.quotes.searchsorted(end)].tolist()
        data, delimiter = self.data, self.dialect.delimiter
        bounds = zip([start, *(q + 1 for q in inside[1::2])], [*inside[0::2], end])
        fields = 1 + sum(data.count(delimiter, lo, hi) for lo, hi in bounds)
        return fields, any(data[q + 1] not in self._closing for q in inside[1::2])

    # One record, closely -------------------------------------------------------------------

    def settle(self, start: int, fields: int | None, limit: int) -> int | _Rejected | None:
        """The record at ``start``, looked at closely: where it stops, or why its first line is
        rejected, or None when it goes on in the next chunk."""
        line_end = self.next_line_end(start)
        room = len(self.data) - start
        if line_end is None or line_end - start > limit:
            if line_end is None and room <= limit and not self.final:
                return None
            return _Rejected(
                None if line_end is None else line_end + 1,
                f"longer than the row limit of {limit} bytes ({MAX_ROW_BYTES_KEY}): "
                f"{self._preview(start, start + limit + 1)}",
            )  # as much as any chunk holds
        if not self.dialect.quoting:
            return line_end + 1
        end, found, stray = self._quoted_record_end(start, limit)
        first_line = self._preview(start, line_end)
        if end is None and room <= limit:
            if not self.final:
                return None
            return _Rejected(line_end + 1, f"unterminated quote (still open at the end of the file): {first_line}")
        if end is None or end - start > limit:
            return _Rejected(
                line_end + 1,
                f"a quoted record over several lines, longer than the row limit of {limit} "
                f"bytes ({MAX_ROW_BYTES_KEY}) (an unterminated quote?): {first_line}",
            )
        lines = self.line_index(end) - self.line_index(start) + 1
        if lines > 1 and fields is not None and (found, stray) != (fields, False):
            why = f"expected {fields} columns, got {found}" if found != fields else "text after a closing quote"
            return _Rejected(line_end + 1, f"{why} in a record over {lines} lines (a stray quote?): {first_line}")
        return end + 1

    def _quoted_record_end(self, start: int, limit: int) -> tuple[int | None, int, bool]:
        """pyarrow's end of the csv record at ``start`` (its line end; None when its quote is open at
        the end of the chunk or past ``limit``), its number of fields, and whether text follows a
        closing quote."""
        data, delimiter, quotes = self.data, self.dialect.delimiter, self.quotes
        k, here, fields, stray = int(quotes.searchsorted(start)), start, 1, False
        while here - start <= limit:
            line_end = self.next_line_end(here)
            quote = int(quotes[k]) if k < len(quotes) else None
            if quote is None or (line_end is not None and line_end < quote):
                return line_end, fields + (0 if line_end is None else data.count(delimiter, here, line_end)), stray
            fields += data.count(delimiter, here, quote)
            k += 1
            if quote > start and data[quote - 1] != delimiter[0]:  # inside an unquoted field: text
                here = quote + 1
                continue
            while k + 1 < len(quotes) and quotes[k + 1] == quotes[k] + 1:  # "" inside quotes
                k += 2
            if k == len(quotes) or (quotes[k] == len(data) - 1 and not self.final):
                return None, fields, stray
            here = quotes[k] + 1
            stray = stray or data[here] not in self._closing
            k += 1
        return None, fields, stray

    def _preview(self, start: int, stop: int) -> str:
        return preview(self.data[start : min(stop, start + _PREVIEW)])


def preview(raw: bytes | str) -> str:
    """The start of a rejected line, as text for a reject detail."""
    start = raw[:_PREVIEW]
    return repr((start if isinstance(start, str) else bytes(start).decode("utf-8", "replace")).rstrip("\r\n"))
