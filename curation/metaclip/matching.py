"""MetaCLIP's substring matching, with an Aho-Corasick automaton instead of a loop over entries.

The semantics are MetaCLIP 1's, exactly: a caption is normalised as ``" " + text + " "`` with
each of ``, . ; : ? !`` and the backtick wrapped in spaces and tab, newline and carriage return
turned into spaces; entry ``e`` matches when ``" " + e + " "`` occurs in it (overlapping
entries included; each entry counts once per caption). ``case_sensitive`` (default true, as
MetaCLIP) and ``extra_punctuation`` (more characters to wrap) are the only options.

Speed: the normalisation is vectorised over the batch (Arrow kernels), and the whole batch is
searched in one pass of the automaton over the captions joined by a separator that no padded
entry can contain, then match positions are mapped back to rows with a binary search.
"""

from __future__ import annotations

from collections.abc import Sequence

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PUNCTUATION = ",.;:?!`"
WHITESPACE = "\t\n\r"
_SEPARATOR = "\x00"  # never in a padded entry (entries are checked to be free of it)


def normalize(text: str, punctuation: str = PUNCTUATION) -> str:
    """One caption, normalised the way MetaCLIP does (the reference for the vectorised version)."""
    spaced = f" {text} "
    for mark in punctuation:
        spaced = spaced.replace(mark, f" {mark} ")
    for char in WHITESPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def normalize_batch(texts: pa.Array | pa.ChunkedArray, punctuation: str = PUNCTUATION,
                    case_sensitive: bool = True) -> pa.Array:
    """:func:`normalize` over a column of captions, with Arrow kernels."""
    spaced = pc.binary_join_element_wise(" ", pc.fill_null(texts, ""), " ", "")
    for mark in punctuation:
        spaced = pc.replace_substring(spaced, mark, f" {mark} ")
    for char in WHITESPACE:
        spaced = pc.replace_substring(spaced, char, " ")
    return spaced if case_sensitive else pc.utf8_lower(spaced)


class EntryMatcher:
    """Finds, for each caption, the ids (metadata positions) of the entries it matches."""

    def __init__(self, entries: Sequence[str], case_sensitive: bool = True, extra_punctuation: str = "") -> None:
        self.size = len(entries)
        self.case_sensitive = case_sensitive
        self.punctuation = PUNCTUATION + "".join(c for c in extra_punctuation if c not in PUNCTUATION)
        padded = pc.binary_join_element_wise(" ", pa.array(list(entries), pa.string()), " ", "")
        if not case_sensitive:
            padded = pc.utf8_lower(padded)  # the same kernel as the captions: the same lower case
        self.automaton = ahocorasick.Automaton()
        keys: dict[str, list[int]] = {}
        for entry_id, key in enumerate(padded.to_pylist()):
            if _SEPARATOR in key:
                raise ValueError(f"metadata entry {entry_id} holds a NUL character")
            keys.setdefault(key, []).append(entry_id)
        self._shared: list[tuple[int, ...]] = []  # entries sharing a key (only when case-insensitive)
        for key, ids in keys.items():
            if len(ids) == 1:
                self.automaton.add_word(key, ids[0])
            else:
                self.automaton.add_word(key, -1 - len(self._shared))
                self._shared.append(tuple(ids))
        self.automaton.make_automaton()

    def match(self, texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """A ``list<int32>`` of sorted, distinct entry ids per caption (null captions match nothing)."""
        normalized = normalize_batch(texts, self.punctuation, self.case_sensitive)
        n = len(normalized)
        if n == 0:
            return pa.array([], pa.list_(pa.int32()))
        lengths = pc.utf8_length(normalized).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])  # +1: the separator
        joined = _SEPARATOR.join(normalized.to_pylist())
        found = list(self.automaton.iter(joined))
        if not found:
            return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int32()))
        ends = np.fromiter((end for end, _ in found), np.int64, len(found))
        ids = np.fromiter((value for _, value in found), np.int64, len(found))
        rows = np.searchsorted(starts, ends, side="right") - 1
        if self._shared and (ids < 0).any():
            rows, ids = self._expand_shared(rows, ids)
        pairs = np.unique(rows * self.size + ids)  # distinct (row, id), sorted by row then id
        rows, ids = pairs // self.size, pairs % self.size
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32)))

    def _expand_shared(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ids >= 0
        extra_rows, extra_ids = [rows[keep]], [ids[keep]]
        for row, value in zip(rows[~keep], ids[~keep]):
            shared = self._shared[-1 - int(value)]
            extra_rows.append(np.full(len(shared), row))
            extra_ids.append(np.array(shared))
        return np.concatenate(extra_rows), np.concatenate(extra_ids)
