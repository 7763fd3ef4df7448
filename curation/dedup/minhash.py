"""MinHash signatures and LSH banding for a whole batch of captions at once.

The signatures are exactly datasketch's (``MinHash(num_perm, seed)``, its default ``affine32``
scheme: each shingle hashed with ``sha1_hash32``, pre-mixed with the MurmurHash3 finalizer, then
``a * h + b`` modulo 2^32 per permutation, minimum over the shingles), so results can be checked
against datasketch and sketches stay comparable across runs and versions. What differs is the
loop: shingles come from one polars query over the batch, SHA-1 runs once per *distinct*
shingle, and the permutations and minima are numpy array operations over all the rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl

SHINGLE_KINDS = ("word", "char")
_MAX_HASH = np.uint32(0xFFFFFFFF)
#: Permuted values computed at once per chunk (rows x shingles x permutations), bounding memory.
_CHUNK_VALUES = 1 << 24


@dataclass(frozen=True)
class Shingles:
    """The distinct shingle hashes of each row, as CSR: ``hashes[offsets[i]:offsets[i + 1]]``
    (sorted, unique) are row ``i``'s. A row with no shingle (empty caption) has none."""

    offsets: np.ndarray  # int64, num_rows + 1
    hashes: np.ndarray  # uint32

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def caption_series(column) -> pl.Series:
    """An Arrow string column as a polars Series (an empty one keeps its string type)."""
    return pl.Series(column.combine_chunks()) if len(column) else pl.Series([], dtype=pl.String)


def normalise(captions: pl.Series) -> pl.Series:
    """Lower case, punctuation to spaces, runs of white space to one space, trimmed."""
    return (
        captions.fill_null("")
        .str.to_lowercase()
        .str.replace_all(r"[^\w\s]", " ")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def shingle(captions: pl.Series, kind: str, size: int) -> Shingles:
    """Word or character ``size``-grams of the normalised captions, hashed with sha1_hash32.

    A caption shorter than one shingle is one shingle (itself); an empty one has none.
    """
    text = normalise(captions)
    if kind == "word":
        grams = _word_grams(text, size)
    elif kind == "char":
        grams = _char_grams(text, size)
    else:
        raise ValueError(f"shingle kind must be one of {SHINGLE_KINDS}, got {kind!r}")
    distinct = grams.select(pl.col("gram").unique(maintain_order=True))["gram"]
    table = pl.DataFrame({"gram": distinct, "hash": pl.Series(_sha1_hash32(distinct.to_list()), dtype=pl.UInt32)})
    hashed = grams.join(table, on="gram", how="left").select("row", "hash").unique().sort("row", "hash")
    rows = hashed["row"].to_numpy()
    offsets = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(text)), out=offsets[1:])
    return Shingles(offsets, hashed["hash"].to_numpy().astype(np.uint32))


def _word_grams(text: pl.Series, size: int) -> pl.DataFrame:
    words = (
        pl.DataFrame({"words": text.str.split(" ")})
        .with_row_index("row")
        .explode("words")
        .filter(pl.col("words") != "")
        .with_columns(pl.int_range(pl.len()).over("row").alias("pos"), pl.len().over("row").alias("n"))
    )
    gram = pl.col("words")
    for step in range(1, size):
        gram = gram + " " + pl.col("words").shift(-step).over("row")
    # Positions that start a full gram, or position 0 of a caption shorter than one gram.
    starts = (pl.col("pos") + size <= pl.col("n")) | ((pl.col("pos") == 0) & (pl.col("n") < size))
    short = pl.col("words").str.join(" ").over("row")
    return (
        words.with_columns(pl.when(pl.col("n") < size).then(short).otherwise(gram).alias("gram"))
        .filter(starts)
        .select(pl.col("row").cast(pl.Int64), "gram")
    )


def _char_grams(text: pl.Series, size: int) -> pl.DataFrame:
    frame = pl.DataFrame({"text": text}).with_row_index("row").filter(pl.col("text") != "")
    lengths = frame["text"].str.len_chars().cast(pl.Int64)
    frame = frame.with_columns(pl.int_ranges(0, (lengths - size + 1).clip(lower_bound=1)).alias("pos")).explode("pos")
    return frame.select(pl.col("row").cast(pl.Int64), pl.col("text").str.slice(pl.col("pos"), size).alias("gram"))


def _sha1_hash32(values: list[str]) -> np.ndarray:
    """datasketch's ``sha1_hash32`` of each UTF-8 string: the digest's first 4 bytes, little endian."""
    digests = b"".join(hashlib.sha1(v.encode()).digest()[:4] for v in values)
    return np.frombuffer(digests, dtype="<u4").astype(np.uint32)


class MinHasher:
    """``num_perm`` permutations drawn exactly as datasketch 2's ``MinHash(num_perm, seed)``."""

    def __init__(self, num_perm: int = 128, seed: int = 1) -> None:
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        generator = np.random.RandomState(seed)
        self.num_perm = num_perm
        self.a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        self.b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def signatures(self, shingles: Shingles) -> np.ndarray:
        """``(rows, num_perm)`` uint32; a row with no shingle is all 0xFFFFFFFF (datasketch's empty)."""
        out = np.full((shingles.num_rows, self.num_perm), _MAX_HASH, dtype=np.uint32)
        mixed = _fmix32(shingles.hashes)
        rows = np.flatnonzero(shingles.counts)
        total = np.cumsum(shingles.counts[rows])
        budget = max(1, _CHUNK_VALUES // self.num_perm)  # shingles per chunk of rows
        start = 0
        while start < len(rows):
            done = total[start - 1] if start else 0
            end = max(start + 1, int(np.searchsorted(total, done + budget, side="right")))
            chunk = rows[start:end]
            first, last = shingles.offsets[chunk[0]], shingles.offsets[chunk[-1] + 1]
            permuted = mixed[first:last, None] * self.a[None, :] + self.b[None, :]
            out[chunk] = np.minimum.reduceat(permuted, shingles.offsets[chunk] - first, axis=0)
            start = end
        return out


def _fmix32(values: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer, wrapping arithmetic as datasketch applies it."""
    h = values.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def lsh_params(
    threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5
) -> tuple[int, int]:
    """Bands and rows per band minimising the weighted false positive and negative areas under
    the LSH S-curve (the criterion datasketch's ``MinHashLSH`` uses, so both pick the same)."""
    from scipy.integrate import quad

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a Jaccard similarity in (0, 1), got {threshold}")
    best, params = float("inf"), (0, 0)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp, _ = quad(lambda s, r=rows, b=bands: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)
            fn, _ = quad(lambda s, r=rows, b=bands: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)
            error = fp * false_positive_weight + fn * false_negative_weight
            if error < best:
                best, params = error, (bands, rows)
    return params


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (row, band): a hash of the band's ``rows`` values. A collision of
    two different bands only adds a candidate pair, which the Jaccard check then drops."""
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    for band in range(bands):
        h = np.full(len(signatures), np.uint64(0x9E3779B97F4A7C15 ^ band), dtype=np.uint64)
        for value in signatures[:, band * rows : (band + 1) * rows].T:
            h = mix64(h ^ value.astype(np.uint64))
        keys[:, band] = h
    return keys


def mix64(h: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (MurmurHash3's fmix64 constants): well spread keys from any integers."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def candidate_pairs(keys: np.ndarray, eligible: np.ndarray, max_bucket: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs ``(i, j)``, ``i < j``, of eligible rows sharing a key in some band, each pair once.

    A bucket of at most ``max_bucket`` rows gives all its pairs; a larger one (boilerplate
    repeated thousands of times) gives each member paired with the bucket's first row only, so
    the pair count stays linear. Returns the pairs and how many buckets were that large.
    """
    rows = np.flatnonzero(eligible)
    lefts, rights, capped = [], [], 0
    for band in range(keys.shape[1]):
        key = keys[rows, band]
        order = np.argsort(key, kind="stable")
        sorted_key, sorted_rows = key[order], rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        sizes = np.diff(np.r_[starts, len(sorted_key)])
        for size in np.unique(sizes[sizes > 1]):
            groups = starts[sizes == size]
            members = sorted_rows[groups[:, None] + np.arange(size)[None, :]]
            if size > max_bucket:
                capped += len(groups)
                i = np.repeat(members[:, 0], size - 1)
                j = members[:, 1:].ravel()
            else:
                a, b = np.triu_indices(size, k=1)
                i, j = members[:, a].ravel(), members[:, b].ravel()
            lefts.append(np.minimum(i, j))
            rights.append(np.maximum(i, j))
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), capped
    pairs = np.unique(np.stack([np.concatenate(lefts), np.concatenate(rights)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), capped


def jaccard(shingles: Shingles, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of each pair, for all pairs at once."""
    if len(left) == 0:
        return np.zeros(0)
    counts = shingles.counts
    sizes = counts[left] + counts[right]
    values = np.concatenate([_gather(shingles, left), _gather(shingles, right)])
    pair = np.concatenate(
        [np.repeat(np.arange(len(left)), counts[left]), np.repeat(np.arange(len(left)), counts[right])]
    )
    order = np.lexsort((values, pair))
    values, pair = values[order], pair[order]
    same = (values[1:] == values[:-1]) & (pair[1:] == pair[:-1])  # within a set values are unique
    inter = np.bincount(pair[1:][same], minlength=len(left))
    union = sizes - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _gather(shingles: Shingles, rows: np.ndarray) -> np.ndarray:
    """The concatenated shingle hashes of ``rows`` (with repeats), without a Python loop."""
    counts = shingles.counts[rows]
    starts = np.repeat(shingles.offsets[rows], counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return shingles.hashes[starts + within]


def concat_shingles(parts: list[Shingles]) -> Shingles:
    """The shingles of several batches, rows in order."""
    if not parts:
        return Shingles(np.zeros(1, np.int64), np.zeros(0, np.uint32))
    offsets = [parts[0].offsets]
    for part in parts[1:]:
        offsets.append(part.offsets[1:] + offsets[-1][-1])
    return Shingles(np.concatenate(offsets), np.concatenate([p.hashes for p in parts]))
