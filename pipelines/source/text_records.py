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

Vectorised on numpy (:mod:`pipelines.source.text_chunk`): quote parity at each line end finds
the record ends; a record whose quotes pyarrow reads differently (a quote inside an unquoted
field), or that breaks a rule above, is walked quote by quote.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.source.text_chunk import NO_POSITIONS, Chunk, Dialect, Rejected
from pipelines.stage import storage
from schemas import rejects as R

CHUNK_BYTES = 4 << 20
_BATCH_ITEMS = 1 << 16  # records and rejects in one batch, whatever the lines are like
_READ_BYTES = 1 << 16


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
        self._stream = storage.open_input_stream(path)
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
            if isinstance(outcome, Rejected):
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

    def _next_chunk(self) -> Chunk:
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
        return Chunk(data, self.dialect, final=self._done and self.failure is None, scratch=self._scratch)

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

    def _consume(self, chunk: Chunk, upto: int, start: int = 0) -> None:
        """Count the line ends from ``start`` to ``upto`` as read; keep what follows for the next chunk."""
        self.lines_read += chunk.line_index(upto) - chunk.line_index(start)
        self._carry = chunk.data[upto:]

    def _split(self, chunk: Chunk, fields: int | None) -> RecordBatch:
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


def _batch(chunk: Chunk, found: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rejects: list[Reject]) -> RecordBatch:
    """The non-empty records found, with each reject's slot counted in non-empty records."""
    starts, stops, lines = (
        (np.concatenate(part) for part in zip(*found)) if found else (NO_POSITIONS, NO_POSITIONS, NO_POSITIONS)
    )
    empty = chunk.is_empty(starts, stops)
    if empty.any():
        kept_before = np.concatenate([[0], np.cumsum(~empty)])
        rejects = [Reject(int(kept_before[r.slot]), r.reason, r.detail) for r in rejects]
        starts, stops, lines = starts[~empty], stops[~empty], lines[~empty]
    return RecordBatch(chunk.data, starts, stops, lines, rejects)
