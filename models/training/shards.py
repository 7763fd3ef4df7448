"""Streaming (image bytes, caption) samples from exported shards: webdataset tars or parquet.

A training source is a run directory (its ``export/`` is used), an export folder, a folder of
tars or parquet files, a glob, or one file. Samples stream shard by shard; nothing is held in
memory beyond a shuffle buffer. The order of an epoch depends only on the seed and the epoch
(shard order shuffled, then a buffer shuffle), so a resumed run replays it and skips what it
had consumed. With several workers, each reads every ``world_size``-th shard.

A sample with a keep probability below 1 (the ``keep_probability`` column of a run with online
MetaCLIP balancing) is in an epoch with that probability, drawn again each epoch from the seed,
the epoch and its key: every epoch is balanced, and over several epochs every row is seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from schemas.columns import KEEP_PROBABILITY

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Sample:
    """One training pair as stored: its key, encoded image, caption and per-epoch keep probability."""

    key: str
    image: bytes
    caption: str
    keep_probability: float = 1.0


def resolve_shards(sources: list[str]) -> list[Path]:
    """The shard files (``.tar`` or ``.parquet``) behind each source, in a stable order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for candidate in (
                path / "export" / "webdataset",
                path / "webdataset",
                path / "export" / "parquet",
                path / "parquet",
                path,
            ):
                found = sorted(candidate.glob("*.tar")) or sorted(candidate.glob("*.parquet"))
                if found:
                    files += found
                    break
            else:
                raise FileNotFoundError(f"no .tar or .parquet shards under {path} (nor its export/ folder)")
        elif path.is_file():
            files.append(path)
        else:
            matched = sorted(Path(p) for p in glob.glob(source))
            if not matched:
                raise FileNotFoundError(f"training source {source!r} matches no file")
            files += matched
    bad = [f for f in files if f.suffix not in (".tar", ".parquet")]
    if bad:
        raise ValueError(f"training shards must be .tar (webdataset) or .parquet, got {bad[0]}")
    return files


def iter_shard(path: Path) -> Iterator[Sample]:
    """The samples of one shard in stored order; an incomplete tar sample is an error."""
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        yield from _iter_tar(path)


def _iter_parquet(path: Path) -> Iterator[Sample]:
    reader = pq.ParquetFile(path)
    names = set(reader.schema_arrow.names)
    if not {"image", "caption"} <= names:
        raise ValueError(f"{path} lacks the image and caption columns (has {sorted(names)})")
    key_column = "uid" if "uid" in names else None
    weighted = KEEP_PROBABILITY in names
    columns = ["image", "caption"] + ([key_column] if key_column else []) + ([KEEP_PROBABILITY] if weighted else [])
    row = 0
    for batch in reader.iter_batches(batch_size=256, columns=columns):
        keys = batch.column(key_column).to_pylist() if key_column else None
        images, captions = batch.column("image").to_pylist(), batch.column("caption").to_pylist()
        chances = batch.column(KEEP_PROBABILITY).to_pylist() if weighted else None
        for i, (image, caption) in enumerate(zip(images, captions)):
            chance = chances[i] if chances and chances[i] is not None else 1.0
            yield Sample(keys[i] if keys else f"{path.stem}-{row}", image, caption, chance)
            row += 1


def _iter_tar(path: Path) -> Iterator[Sample]:
    current: dict[str, bytes] = {}
    current_key = None
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if key != current_key:
                if current_key is not None:
                    yield _tar_sample(path, current_key, current)
                current_key, current = key, {}
            current[ext.lower()] = tar.extractfile(member).read()
    if current_key is not None:
        yield _tar_sample(path, current_key, current)


def _tar_sample(path: Path, key: str, parts: dict[str, bytes]) -> Sample:
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None or "txt" not in parts:
        raise ValueError(f"{path}: sample {key!r} lacks an image or a .txt caption (has {sorted(parts)})")
    return Sample(key, image, parts["txt"].decode("utf-8"), _keep_probability(path, key, parts.get("json")))


def _keep_probability(path: Path, key: str, metadata: bytes | None) -> float:
    """The ``keep_probability`` of a tar sample's ``.json`` (1 without one)."""
    if metadata is None or KEEP_PROBABILITY.encode() not in metadata:
        return 1.0
    try:
        value = json.loads(metadata)[KEEP_PROBABILITY]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: sample {key!r} has an unreadable {KEEP_PROBABILITY} in its .json: {e}") from None
    return 1.0 if value is None else float(value)


def in_epoch(seed: int, epoch: int, keys: Sequence[str], keep_probability: Sequence[float]) -> np.ndarray:
    """Whether each sample is in epoch ``epoch``: a uniform draw from (seed, epoch, key) below its
    keep probability (always for a probability of 1 or more)."""
    chances = np.asarray(keep_probability, np.float64)
    keep = chances >= 1.0
    prefix = f"{seed}:{epoch}\x1f".encode()
    for i in np.flatnonzero(~keep):
        digest = hashlib.blake2b(prefix + keys[i].encode(), digest_size=8).digest()
        keep[i] = int.from_bytes(digest, "little") / 2.0**64 < chances[i]
    return keep


def epoch_samples(
    files: list[Path],
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    reader: Callable[[Path], Iterator[Any]] | None = None,
    every_sample: bool = False,
) -> Iterator[Any]:
    """The samples of one epoch for worker ``rank``, in an order fixed by ``(seed, epoch)``.

    ``reader`` yields the samples of one file (default :func:`iter_shard`: image-caption shards);
    a sample's ``keep_probability`` decides whether it is in this epoch (:func:`in_epoch`) unless
    ``every_sample``.
    """
    reader = reader or iter_shard
    mine = files[rank::world_size]
    if not mine:
        raise ValueError(f"{len(files)} shard(s) cannot feed {world_size} workers: export more, smaller shards")
    rng = random.Random(f"{seed}:{epoch}:{rank}")
    order = list(mine)
    rng.shuffle(order)
    buffer: list[Any] = []
    for path in order:
        for sample in reader(path):
            if not every_sample and not _in_epoch(seed, epoch, sample):
                continue
            if shuffle_buffer <= 1:
                yield sample
                continue
            if len(buffer) < shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
    rng.shuffle(buffer)
    yield from buffer


def _in_epoch(seed: int, epoch: int, sample: Any) -> bool:
    chance = sample.keep_probability
    return chance >= 1.0 or bool(in_epoch(seed, epoch, [sample.key], [chance])[0])
