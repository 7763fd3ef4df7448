"""Tests of pipelines/source/row_hash.py: row uids are XXH3-128 of the key, computed a column at a time."""

from __future__ import annotations

import pyarrow as pa
import pytest
import xxhash

from pipelines.source.row_hash import row_uids

KEYS = ["", "a", "0\x1fhttps://x.test/a.jpg\x1fa dog", "ü" * 300, "x" * 5000]


def test_each_uid_is_the_published_xxh3_128_of_its_key():
    uids = row_uids(pa.array(KEYS, pa.string()))
    assert uids.type == pa.string()
    assert uids.to_pylist() == [xxhash.xxh3_128_hexdigest(k.encode()) for k in KEYS]


def test_binary_sliced_and_chunked_keys_give_the_same_uids():
    expected = [xxhash.xxh3_128_hexdigest(k.encode()) for k in KEYS]
    binary = pa.array([k.encode() for k in KEYS], pa.binary())
    assert row_uids(binary).to_pylist() == expected
    assert row_uids(binary.slice(2, 2)).to_pylist() == expected[2:4]
    chunked = pa.chunked_array([pa.array(KEYS[:2]), pa.array(KEYS[2:])])
    assert row_uids(chunked).to_pylist() == expected


def test_no_keys_give_no_uids():
    assert row_uids(pa.array([], pa.string())).to_pylist() == []


def test_a_null_key_is_refused():
    with pytest.raises(ValueError, match="null"):
        row_uids(pa.array(["a", None]))
