"""MinHash signatures, LSH banding and Jaccard: identical to datasketch, exact where it matters."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from curation.dedup.minhash import MinHasher, band_keys, candidate_pairs, jaccard, lsh_params, normalise, shingle

CAPTIONS = [
    "A dog runs across the green grass.",
    "a dog runs across the green grass",
    "A dog is running across the green grass .",
    "Two children play football on a beach",
    "",
    "dog",
    "A black cat sleeps on a red sofa in the sun",
    None,
]


def _python_shingles(text: str, kind: str, size: int) -> set[str]:
    words = text.split()
    if kind == "char":
        return {text[i : i + size] for i in range(max(1, len(text) - size + 1))} if text else set()
    if not words:
        return set()
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@pytest.mark.parametrize(("kind", "size"), [("word", 1), ("word", 2), ("word", 3), ("char", 5)])
def test_signatures_equal_datasketch(kind, size):
    texts = normalise(pl.Series(CAPTIONS, dtype=pl.String)).to_list()
    shingles = shingle(pl.Series(CAPTIONS, dtype=pl.String), kind, size)
    ours = MinHasher(64, seed=3).signatures(shingles)
    for row, text in enumerate(texts):
        reference = MinHash(num_perm=64, seed=3)
        for gram in sorted(_python_shingles(text, kind, size)):
            reference.update(gram.encode())
        assert shingles.counts[row] == len(_python_shingles(text, kind, size))
        assert np.array_equal(ours[row], reference.hashvalues), (kind, size, text)


def test_normalise_folds_case_punctuation_and_space():
    assert normalise(pl.Series(["  A Dog,  runs!\tHOME. "])).to_list() == ["a dog runs home"]


def test_lsh_params_match_datasketch():
    for threshold, num_perm in [(0.5, 64), (0.8, 128), (0.9, 256)]:
        assert lsh_params(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_candidate_pairs_are_datasketch_lsh_candidates():
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(40)]
    base = [" ".join(rng.choice(vocabulary, 8)) for _ in range(30)]
    texts = base + [t.rsplit(" ", 1)[0] + " extra" for t in base[:15]]
    shingles = shingle(pl.Series(texts), "word", 1)
    signatures = MinHasher(128).signatures(shingles)
    bands, rows = lsh_params(0.5, 128)
    left, right, capped = candidate_pairs(band_keys(signatures, bands, rows), shingles.counts > 0, max_bucket=1000)
    lsh = MinHashLSH(num_perm=128, params=(bands, rows))
    sketches = []
    for i, sig in enumerate(signatures):
        sketch = MinHash(num_perm=128, hashvalues=sig, scheme="affine32")
        lsh.insert(i, sketch)
        sketches.append(sketch)
    expected = {(min(i, j), max(i, j)) for i, s in enumerate(sketches) for j in lsh.query(s) if i != j}
    assert set(zip(left.tolist(), right.tolist())) == expected and capped == 0


def test_large_buckets_are_linked_to_one_row():
    keys = np.zeros((100, 1), dtype=np.uint64)  # one bucket of 100 rows
    left, right, capped = candidate_pairs(keys, np.ones(100, dtype=bool), max_bucket=10)
    assert capped == 1 and len(left) == 99 and set(left.tolist()) == {0}
    left, _, capped = candidate_pairs(keys, np.ones(100, dtype=bool), max_bucket=100)
    assert capped == 0 and len(left) == 100 * 99 // 2


def test_jaccard_is_exact():
    texts = ["a b c d", "a b c e", "x y", "", "a b c d"]
    shingles = shingle(pl.Series(texts), "word", 1)
    pairs = list(itertools.combinations(range(len(texts)), 2))
    got = jaccard(shingles, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    for (i, j), value in zip(pairs, got):
        a, b = set(texts[i].split()), set(texts[j].split())
        assert value == pytest.approx(len(a & b) / len(a | b) if a | b else 0.0)
