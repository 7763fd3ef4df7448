"""Tiny synthetic image sets written with PIL: class folders, the same as a tar, captioned images."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

#: Synthetic classes and their image counts; ``dog_house`` also holds a corrupt file.
CLASS_SIZES = {"ant": 2, "bird": 2, "cat": 3, "dog_house": 2, "eel": 1, "fox": 2}
CORRUPT = "dog_house/broken.jpg"


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 14)) -> None:
    """A small random RGB image (JPEG or PNG by suffix)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A stand-in preprocess: 8x8, channels first, floats in [0, 1]."""
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``<root>/<class>/*.jpg|png`` per CLASS_SIZES, one corrupt JPEG, a text file and an empty folder."""
    root = tmp_path / "folder"
    seed = 0
    for name, count in CLASS_SIZES.items():
        for i in range(count):
            write_image(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}", seed)
            seed += 1
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def image_tar(image_folder: Path, tmp_path: Path) -> Path:
    """The image folder as a tar under ``data/test/<class>/``, plus an image outside any class folder."""
    path = tmp_path / "images.tar"
    write_image(tmp_path / "stray.png", 99)
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "stray.png", arcname="stray.png")
        for file in sorted(image_folder.rglob("*"), reverse=True):  # archive order differs from sorted order
            if file.is_file():
                tar.add(file, arcname=f"data/test/{file.relative_to(image_folder)}")
    return path


@pytest.fixture
def captioned_jsonl(tmp_path: Path) -> Path:
    """8 images with 2 captions each (one image file missing) and 3 malformed rows."""
    images = tmp_path / "images"
    rows = []
    for i in range(8):
        if i != 5:
            write_image(images / f"img{i}.jpg", 100 + i)
        rows.append(json.dumps({"image": f"img{i}.jpg", "captions": [f"picture number {i}", f"image {i} of a thing"]}))
    rows += [
        "{not json",
        json.dumps({"captions": ["no image"]}),
        json.dumps({"image": "img9.jpg", "captions": ["", " "]}),
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path
