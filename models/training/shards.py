"""Streaming (image bytes, caption) samples from exported shards: webdataset tars or parquet.

A training source is a run directory (its ``export/`` is used), an export folder, a folder of
tars or parquet files, a glob, or one file. Samples stream shard by shard; nothing is held in
memory beyond a shuffle buffer. The order of an epoch depends only on the seed and the epoch
(shard order shuffled, then a buffer shuffle), so a resumed run replays it and skips what it
had consumed. With several workers, each reads every ``world_size``-th shard.
"""

from __future__ import annotations

import glob
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Sample:
    """One training pair as stored: its key, encoded image and caption."""

    key: str
    image: bytes
    caption: str


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
    columns = ["image", "caption"] + ([key_column] if key_column else [])
    row = 0
    for batch in reader.iter_batches(batch_size=256, columns=columns):
        keys = batch.column(key_column).to_pylist() if key_column else None
        images, captions = batch.column("image").to_pylist(), batch.column("caption").to_pylist()
        for i, (image, caption) in enumerate(zip(images, captions)):
            yield Sample(keys[i] if keys else f"{path.stem}-{row}", image, caption)
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
    return Sample(key, image, parts["txt"].decode("utf-8"))


def epoch_samples(
    files: list[Path],
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    reader: Callable[[Path], Iterator[Any]] | None = None,
) -> Iterator[Any]:
    """The samples of one epoch for worker ``rank``, in an order fixed by ``(seed, epoch)``.

    ``reader`` yields the samples of one file (default :func:`iter_shard`: image-caption shards).
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
