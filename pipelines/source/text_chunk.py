"""A chunk of a csv, tsv or jsonl file: its line ends, its quotes, and where its records end.

:class:`~pipelines.source.text_records.RecordReader` reads a file chunk by chunk; a
:class:`Chunk` finds the record ends in one, vectorised on numpy (quote parity at each line end),
and walks quote by quote only a record whose quotes pyarrow would read differently or that breaks
a rule (too long, the wrong number of fields, an unterminated quote).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: The config key that sets ``max_row_bytes``, named in reject details.
MAX_ROW_BYTES_KEY = "input_max_row_bytes"

_LF, _CR, _QUOTE = ord("\n"), ord("\r"), ord('"')
#: An empty array of positions.
NO_POSITIONS = np.empty(0, np.int64)
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
class Rejected:
    """Why the first line of a record is rejected, and where reading resumes (None: past the end of
    an over-long line that goes on beyond the chunk)."""

    resume: int | None
    why: str


@dataclass
class Parity:
    """Record ends for records that start after an even (or odd) number of the chunk's quotes."""

    ends: np.ndarray  # positions of the line ends that end a record
    line_index: np.ndarray  # their indices in the chunk's line ends
    problems: np.ndarray  # j where the record after ends[j - 1] is too long or has the wrong fields
    unquoted: np.ndarray  # quotes that would open a field but stand inside an unquoted one (text to pyarrow)

    @functools.cached_property
    def problem_set(self) -> set[int]:
        return set(self.problems.tolist())


class Chunk:
    """One chunk of the file (with whatever the last one left unfinished) and its line ends and quotes."""

    def __init__(self, data: bytearray, dialect: Dialect, final: bool, scratch: np.ndarray) -> None:
        if final and data and not data.endswith(b"\n") and not (dialect.lone_cr and data.endswith(b"\r")):
            data += b"\n"  # the last line needs no line end
        self.data, self.dialect, self.final = data, dialect, final
        self._closing = {dialect.delimiter[0], _LF, _CR, _QUOTE}  # what may follow a quote that closes a field
        self.bytes = np.frombuffer(data, np.uint8)
        self._scratch = scratch[: len(data)]
        self.line_ends = self._find_line_ends()
        self.quotes = self._positions(_QUOTE) if dialect.quoting and b'"' in data else NO_POSITIONS
        self._quote_parity: np.ndarray | None = None
        self._parities: dict[tuple[int, int | None], Parity] = {}

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
            return NO_POSITIONS, NO_POSITIONS, NO_POSITIONS, pos, problem
        starts = np.concatenate([[pos], ends[:-1] + 1])
        lines = np.concatenate([[self.line_index(pos)], parity.line_index[first : first + len(ends) - 1] + 1])
        return starts, ends + 1, lines, int(ends[-1]) + 1, problem

    def _parity(self, odd: int, fields: int | None, limit: int) -> Parity:
        key = (odd, fields)
        if key not in self._parities:
            self._parities[key] = self._build_parity(odd, fields, limit)
        return self._parities[key]

    def _build_parity(self, odd: int, fields: int | None, limit: int) -> Parity:
        if not len(self.quotes):
            line_index = np.arange(len(self.line_ends))
            unquoted = NO_POSITIONS
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
        return Parity(ends, line_index, problems, unquoted)

    def _is_problem(self, parity: Parity, first: int, start: int, fields: int | None, limit: int) -> bool:
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

    def settle(self, start: int, fields: int | None, limit: int) -> int | Rejected | None:
        """The record at ``start``, looked at closely: where it stops, or why its first line is
        rejected, or None when it goes on in the next chunk."""
        line_end = self.next_line_end(start)
        room = len(self.data) - start
        if line_end is None or line_end - start > limit:
            if line_end is None and room <= limit and not self.final:
                return None
            return Rejected(
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
            return Rejected(line_end + 1, f"unterminated quote (still open at the end of the file): {first_line}")
        if end is None or end - start > limit:
            return Rejected(
                line_end + 1,
                f"a quoted record over several lines, longer than the row limit of {limit} "
                f"bytes ({MAX_ROW_BYTES_KEY}) (an unterminated quote?): {first_line}",
            )
        lines = self.line_index(end) - self.line_index(start) + 1
        if lines > 1 and fields is not None and (found, stray) != (fields, False):
            why = f"expected {fields} columns, got {found}" if found != fields else "text after a closing quote"
            return Rejected(line_end + 1, f"{why} in a record over {lines} lines (a stray quote?): {first_line}")
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
