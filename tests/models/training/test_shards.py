"""Training shards: per-epoch membership from a sample's keep probability (online balancing)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.training.shards import epoch_samples, in_epoch, iter_shard
from pipelines.export.shards import write_webdataset


def _image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(n: int, chance) -> pa.Table:
    return pa.table(
        {
            "uid": [f"u{i:04d}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "image": [_image()] * n,
            "keep_probability": pa.array([chance(i) for i in range(n)], pa.float32()),
        }
    )


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """400 samples: the even ones always in an epoch, the odd ones with probability 0.25."""
    folder = tmp_path_factory.mktemp("weighted")
    rows = _rows(400, lambda i: 1.0 if i % 2 == 0 else 0.25)
    with open(folder / "00000.tar", "wb") as out:
        write_webdataset(rows, out)
    pq.write_table(rows, folder / "00000.parquet")
    return folder


@pytest.mark.parametrize("name", ["00000.tar", "00000.parquet"])
def test_shards_carry_the_keep_probability(weighted, name):
    chances = {s.key: s.keep_probability for s in iter_shard(weighted / name)}
    assert chances["u0000"] == 1.0 and chances["u0001"] == pytest.approx(0.25)


def test_an_epoch_holds_each_sample_with_its_keep_probability(weighted):
    files = [weighted / "00000.tar"]
    epochs = [{s.key for s in epoch_samples(files, seed=1, epoch=e, shuffle_buffer=16)} for e in range(8)]
    even = {f"u{i:04d}" for i in range(0, 400, 2)}
    odd_counts = [len(keys - even) for keys in epochs]
    assert all(even <= keys for keys in epochs)  # probability 1: in every epoch
    assert all(abs(n - 50) < 4 * np.sqrt(200 * 0.25 * 0.75) for n in odd_counts)
    assert len({frozenset(keys) for keys in epochs}) == 8  # a new draw every epoch ...
    seen = len(set().union(*epochs) - even)  # independent draws: 200 x (1 - 0.75**8) = 180 expected
    assert abs(seen - 180) < 4 * np.sqrt(200 * 0.9 * 0.1)  # a fixed draw would see 50
    again = {s.key for s in epoch_samples(files, seed=1, epoch=3, shuffle_buffer=0)}
    assert again == epochs[3]  # membership depends on seed, epoch and key, not on the shuffle
    parquet = {s.key for s in epoch_samples([weighted / "00000.parquet"], seed=1, epoch=3, shuffle_buffer=0)}
    assert parquet == epochs[3]
    every = [s.key for s in epoch_samples(files, seed=1, epoch=3, shuffle_buffer=0, every_sample=True)]
    assert len(every) == 400


def test_in_epoch_matches_the_per_sample_draw():
    keys = [f"k{i}" for i in range(1000)]
    chances = np.linspace(0, 1, 1000)
    members = in_epoch(0, 2, keys, chances)
    assert members[-1] and not members[0]
    assert abs(members.mean() - 0.5) < 0.05
    assert not np.array_equal(members, in_epoch(0, 3, keys, chances))
