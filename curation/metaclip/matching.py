"""MetaCLIP's substring matching, vectorised over a batch, with exactly the plain loop's results.

The semantics are MetaCLIP 1's: a caption is normalised as ``" " + text + " "`` with each of
``, . ; : ? !`` and the backtick wrapped in spaces and tab, newline and carriage return turned
into spaces; entry ``e`` matches when ``" " + e + " "`` occurs in it (overlapping entries
included; each entry counts once per caption). ``case_sensitive`` (default true, as MetaCLIP)
and ``extra_punctuation`` (more characters to wrap) are the only options.

The algorithm. A padded entry starts and ends with a space, so it occurs in the normalised
text exactly when some run of consecutive space-separated segments of the text equals the
entry's segments (``"hot dog"`` is ``["hot", "dog"]``; a double space is an empty segment). So:

1. segments of the batch are mapped to ids in the entries' segment vocabulary, by hash and then
   by string equality (a hash collision can never create a match);
2. one-segment entries (most of a metadata list) are looked up by id in an array;
3. longer windows of known segments that stay inside their caption get a polynomial key,
   extended one segment at a time, and are joined against the entries' keys; every candidate is
   then checked segment by segment, so the result is exact.

No Python runs per caption or per match; the benchmark compares it with a plain loop and with
pyahocorasick.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

PUNCTUATION = ",.;:?!`"
WHITESPACE = "\t\n\r"
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: keys mix well under uint64 wrap-around
_HASH_SEED = 0x5E6


def normalize(text: str, punctuation: str = PUNCTUATION) -> str:
    """One caption, normalised the way MetaCLIP does (the reference for the vectorised version)."""
    spaced = f" {text} "
    for mark in punctuation:
        spaced = spaced.replace(mark, f" {mark} ")
    for char in WHITESPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def normalize_batch(
    texts: pa.Array | pa.ChunkedArray, punctuation: str = PUNCTUATION, case_sensitive: bool = True
) -> pa.Array:
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
        texts = pa.array(list(entries), pa.string())
        if not case_sensitive:
            texts = pc.utf8_lower(texts)  # the same kernel as the captions: the same lower case
        segments = pc.split_pattern(texts, " ")
        lengths = pc.list_value_length(segments).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(segments)
        vocabulary = pc.unique(flat)
        self._vocabulary = pl.DataFrame({"hash": _hash(vocabulary), "id": np.arange(len(vocabulary))})
        self._words = vocabulary
        self._ids = self._segment_ids(flat)  # the entries' segments, as vocabulary ids
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._lengths = lengths
        self.longest = int(lengths.max()) if len(lengths) else 0

        single = np.flatnonzero(lengths == 1)
        first_entry = {}
        for entry, segment in zip(single.tolist(), self._ids[self._offsets[single]].tolist()):
            first_entry.setdefault(segment, []).append(entry)
        self._single = np.full(len(vocabulary), -1, np.int64)  # vocabulary id -> its one-word entry
        for segment, found in first_entry.items():
            self._single[segment] = found[0]
        # Entries equal once lower-cased share a segment (case-insensitive matching only).
        shared = [(segment, entry) for segment, found in first_entry.items() for entry in found[1:]]
        self._shared_single = pl.DataFrame(
            {"id": [s for s, _ in shared], "entry": [e for _, e in shared]}, schema={"id": pl.Int64, "entry": pl.Int64}
        )

        multi = np.flatnonzero(lengths > 1)
        keys = np.zeros(len(multi), np.uint64)
        for j in range(self.longest):
            longer = lengths[multi] > j
            keys[longer] = keys[longer] * _MULTIPLIER + self._ids[self._offsets[multi[longer]] + j].astype(np.uint64)
        self._windows = pl.DataFrame({"k": lengths[multi], "key": keys, "entry": multi})

    def match(self, texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """A ``list<int32>`` of sorted, distinct entry ids per caption (null captions match nothing)."""
        segments = pc.split_pattern(normalize_batch(texts, self.punctuation, self.case_sensitive), " ")
        counts = pc.list_value_length(segments).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = self._segment_ids(pc.list_flatten(segments))
        row = np.repeat(np.arange(len(counts)), counts)
        caption_end = np.repeat(np.cumsum(counts), counts)  # first position after each caption
        found = [self._one_segment(ids, row), self._longer(ids, row, caption_end)]
        rows = np.concatenate([r for r, _ in found])
        entries = np.concatenate([e for _, e in found])
        pairs = np.sort(rows * self.size + entries)  # (row, entry) pairs, by row then entry
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs
        rows, entries = pairs // self.size, pairs % self.size
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(counts)))])
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(entries.astype(np.int32)))

    def _segment_ids(self, flat: pa.Array) -> np.ndarray:
        """Vocabulary id of each segment, -1 where it is in no entry (hash join, then string check)."""
        joined = pl.DataFrame({"hash": _hash(flat), "position": np.arange(len(flat))}).join(
            self._vocabulary, on="hash", how="left"
        )
        position = joined["position"].to_numpy()
        candidate = joined["id"].fill_null(0).to_numpy()
        same = pc.equal(flat.take(pa.array(position)), self._words.take(pa.array(candidate)))
        same = pc.fill_null(pc.and_kleene(same, pa.array(joined["id"].is_not_null().to_numpy())), False)
        same = same.to_numpy(zero_copy_only=False)
        ids = np.full(len(flat), -1, np.int64)
        ids[position[same]] = candidate[same]
        return ids

    def _one_segment(self, ids: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        known = np.flatnonzero(ids >= 0)
        entry = self._single[ids[known]]
        rows, entries = [row[known[entry >= 0]]], [entry[entry >= 0]]
        if len(self._shared_single):
            extra = pl.DataFrame({"id": ids[known], "position": known}).join(self._shared_single, on="id")
            rows.append(row[extra["position"].to_numpy()])
            entries.append(extra["entry"].to_numpy())
        return np.concatenate(rows), np.concatenate(entries)

    def _longer(self, ids: np.ndarray, row: np.ndarray, caption_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of 2.. segments that equal a longer entry."""
        start = np.flatnonzero(ids >= 0)  # windows still alive: known segments, inside the caption
        key = ids[start].astype(np.uint64)
        windows = []
        for k in range(2, self.longest + 1):
            tail = start + k - 1
            inside = tail < caption_end[start]
            start, key, tail = start[inside], key[inside], tail[inside]
            known = ids[tail] >= 0
            start, key, tail = start[known], key[known], tail[known]
            if not len(start):
                break
            key = key * _MULTIPLIER + ids[tail].astype(np.uint64)
            windows.append(pl.DataFrame({"k": np.full(len(start), k, np.int64), "key": key, "start": start}))
        if not windows:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        candidates = pl.concat(windows).join(self._windows, on=["k", "key"])
        start, entry, k = (candidates[c].to_numpy() for c in ("start", "entry", "k"))
        exact = np.ones(len(start), bool)
        for j in range(self.longest):  # check every segment: keys are hashes
            longer = k > j
            exact[longer] &= ids[start[longer] + j] == self._ids[self._offsets[entry[longer]] + j]
        return row[start[exact]], entry[exact]


def _hash(strings: pa.Array) -> np.ndarray:
    return pl.Series(strings).hash(seed=_HASH_SEED).to_numpy()
