"""Streamed readers of evaluation sets: labelled images (a folder or a tar) and captioned images (JSONL).

A reader lists its items when it is built (names only, no pixels) and decodes images one batch at
a time in :meth:`batches`, so memory holds at most one batch. Nothing is dropped silently: rows
that cannot be listed are in the set's ``skipped`` list, and images that cannot be read or decoded
are in each :class:`Batch`'s ``skipped`` list, both with a reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("all", "train", "heldout")

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Skipped:
    """An image or a row left out of an evaluation, and why."""

    item: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Batch:
    """Decoded images of one batch: ``pixels[j]`` is item ``indices[j]`` of the set.

    ``skipped`` lists the items of this stretch of the set that could not be read or decoded;
    a final batch may hold only skipped items (``pixels`` then has no rows).
    """

    pixels: torch.Tensor
    indices: list[int]
    skipped: list[Skipped]


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _decode_batches(
    keys: Sequence[str], read: Callable[[str], bytes], preprocess: Preprocess, batch_size: int
) -> Iterator[Batch]:
    """Read, decode (RGB) and preprocess ``keys`` in order, ``batch_size`` images a batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pixels: list[torch.Tensor] = []
    indices: list[int] = []
    skipped: list[Skipped] = []
    for index, key in enumerate(keys):
        try:
            with Image.open(io.BytesIO(read(key))) as image:
                pixels.append(preprocess(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            skipped.append(Skipped(key, f"{type(exc).__name__}: {exc}"))
            continue
        indices.append(index)
        if len(pixels) == batch_size:
            yield Batch(torch.stack(pixels), indices, skipped)
            pixels, indices, skipped = [], [], []
    if pixels or skipped:
        yield Batch(torch.stack(pixels) if pixels else torch.empty(0), indices, skipped)


class LabelledImageSet:
    """Images labelled by the folder they sit in: ``<root>/<class>/<image>`` or a tar of them.

    In a tar, a member ``<any prefix>/<class>/<file>`` belongs to ``<class>`` (its parent
    folder's name); image members outside any folder are listed in ``skipped``. Class names are
    the sorted names of the folders holding images; labels index them. Files that are not images
    by suffix are ignored. ``per_class`` keeps the first images of each class in sorted order.
    """

    def __init__(self, source: str | Path, per_class: int | None = None):
        self.source = Path(source)
        if per_class is not None and per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        self.skipped: list[Skipped] = []
        self._members: dict[str, tarfile.TarInfo] = {}
        self._is_tar = not self.source.is_dir()
        if not self._is_tar:
            by_class = self._list_folder()
        elif tarfile.is_tarfile(self.source):
            by_class = self._list_tar()
        else:
            raise ValueError(f"{self.source} is neither a folder nor a tar file")
        self.classnames: list[str] = sorted(by_class)
        self.keys: list[str] = []
        self.labels: list[int] = []
        for label, name in enumerate(self.classnames):
            chosen = sorted(by_class[name])[:per_class]
            self.keys.extend(chosen)
            self.labels.extend([label] * len(chosen))

    def _list_folder(self) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        for folder in sorted(p for p in self.source.iterdir() if p.is_dir()):
            files = [f"{folder.name}/{p.name}" for p in folder.iterdir() if p.is_file() and _is_image(p.name)]
            if files:
                by_class[folder.name] = files
        return by_class

    def _list_tar(self) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        with tarfile.open(self.source) as tar:
            for member in tar:
                if not member.isfile() or not _is_image(member.name):
                    continue
                parts = Path(member.name).parts
                if len(parts) < 2:
                    self.skipped.append(Skipped(member.name, "image is not inside a class folder"))
                    continue
                by_class.setdefault(parts[-2], []).append(member.name)
                self._members[member.name] = member
        return by_class

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, preprocess: Preprocess, batch_size: int = 64) -> Iterator[Batch]:
        """Decode the listed images in order; item ``i`` of a batch's ``indices`` has label ``self.labels[i]``."""
        if self._is_tar:
            with tarfile.open(self.source) as tar:

                def read(key: str) -> bytes:
                    handle = tar.extractfile(self._members[key])
                    if handle is None:
                        raise OSError("tar member has no data")
                    return handle.read()

                yield from _decode_batches(self.keys, read, preprocess, batch_size)
        else:
            yield from _decode_batches(self.keys, lambda key: (self.source / key).read_bytes(), preprocess, batch_size)


def is_heldout(image: str, fraction: float) -> bool:
    """Whether ``image`` falls in the held-out split: a hash of its name, stable across row orders."""
    digest = hashlib.sha256(image.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class CaptionedImageSet:
    """Images with one or more captions each, read from a JSONL of ``{"image", "captions"}`` rows.

    ``image`` is a path relative to ``images_dir`` (default: the ``images`` folder beside the
    JSONL); ``captions`` a list of strings (a single ``caption`` string is accepted too). Rows for
    the same image are merged. ``split`` picks images by :func:`is_heldout`: ``"heldout"`` (a
    fraction ``heldout_fraction`` of the names), ``"train"`` (the rest) or ``"all"``; ``limit``
    keeps the first images of the split in file order. Rows that are not valid JSON objects or have
    no non-empty caption are listed in ``skipped``.
    """

    def __init__(
        self,
        jsonl: str | Path,
        images_dir: str | Path | None = None,
        split: str = "all",
        heldout_fraction: float = 0.2,
        limit: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
        self.jsonl = Path(jsonl)
        self.images_dir = Path(images_dir) if images_dir is not None else self.jsonl.parent / "images"
        self.skipped: list[Skipped] = []
        captions: dict[str, list[str]] = {}
        with self.jsonl.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                parsed = self._parse(line, f"{self.jsonl.name}:{number}")
                if parsed is None:
                    continue
                image, texts = parsed
                if split == "all" or is_heldout(image, heldout_fraction) == (split == "heldout"):
                    captions.setdefault(image, []).extend(texts)
        self.images: list[str] = list(captions)[:limit]
        self.captions: list[list[str]] = [captions[image] for image in self.images]

    def _parse(self, line: str, where: str) -> tuple[str, list[str]] | None:
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            self.skipped.append(Skipped(where, f"invalid JSON: {exc}"))
            return None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            self.skipped.append(Skipped(where, "row has no 'image' string"))
            return None
        raw = row.get("captions", row.get("caption"))
        raw = [raw] if isinstance(raw, str) else raw
        texts = [t.strip() for t in raw if isinstance(t, str) and t.strip()] if isinstance(raw, list) else []
        if not texts:
            self.skipped.append(Skipped(row["image"], f"{where}: no non-empty caption"))
            return None
        return row["image"], texts

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        """The number of captions over all listed images."""
        return sum(len(c) for c in self.captions)

    def batches(self, preprocess: Preprocess, batch_size: int = 64) -> Iterator[Batch]:
        """Decode the listed images in order; item ``i`` of a batch's ``indices`` has ``self.captions[i]``."""
        yield from _decode_batches(
            self.images, lambda key: (self.images_dir / key).read_bytes(), preprocess, batch_size
        )
