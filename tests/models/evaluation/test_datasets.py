"""The streamed readers on synthetic sets: classes, limits, splits and reported skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.evaluation import CaptionedImageSet, LabelledImageSet, is_heldout
from tests.models.evaluation.conftest import CLASS_SIZES, CORRUPT, to_tensor


def decode_all(dataset, batch_size: int = 4):
    batches = list(dataset.batches(to_tensor, batch_size))
    indices = [i for b in batches for i in b.indices]
    skipped = [s for b in batches for s in b.skipped]
    return batches, indices, skipped


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_labelled_set_lists_classes_and_reports_the_corrupt_image(kind, image_folder, image_tar):
    dataset = LabelledImageSet(image_folder if kind == "folder" else image_tar)
    assert dataset.classnames == sorted(CLASS_SIZES)  # the empty folder is no class
    assert len(dataset) == sum(CLASS_SIZES.values()) + 1  # the corrupt file is listed, then skipped
    batches, indices, skipped = decode_all(dataset, batch_size=4)
    assert all(len(b.indices) <= 4 and b.pixels.shape[1:] == (3, 8, 8) for b in batches if b.indices)
    assert len(indices) == sum(CLASS_SIZES.values())
    assert [s.item.endswith(CORRUPT) for s in skipped] == [True]
    assert skipped[0].reason.startswith(("OSError", "UnidentifiedImageError"))
    counts = {name: [dataset.labels[i] for i in indices].count(label) for label, name in enumerate(dataset.classnames)}
    assert counts == CLASS_SIZES
    if kind == "tar":
        assert [(s.item, s.reason) for s in dataset.skipped] == [("stray.png", "image is not inside a class folder")]
    else:
        assert dataset.skipped == []


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_per_class_keeps_the_first_images_in_sorted_order(kind, image_folder, image_tar):
    dataset = LabelledImageSet(image_folder if kind == "folder" else image_tar, per_class=1)
    assert [Path(k).parent.name + "/" + Path(k).name for k in dataset.keys] == [
        "ant/000.jpg",
        "bird/000.jpg",
        "cat/000.jpg",
        "dog_house/000.jpg",
        "eel/000.jpg",
        "fox/000.jpg",
    ]
    assert dataset.labels == list(range(6))


def test_folder_and_tar_decode_the_same_pixels(image_folder, image_tar):
    folder, tar = LabelledImageSet(image_folder, per_class=2), LabelledImageSet(image_tar, per_class=2)
    assert folder.labels == tar.labels
    for a, b in zip(folder.batches(to_tensor, 64), tar.batches(to_tensor, 64), strict=True):
        assert a.indices == b.indices and a.pixels.equal(b.pixels)


def test_labelled_set_rejects_a_file_that_is_no_tar(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a tar"):
        LabelledImageSet(tmp_path / "x.txt")


def test_captioned_set_reports_bad_rows_and_missing_images(captioned_jsonl):
    dataset = CaptionedImageSet(captioned_jsonl)
    assert dataset.images == [f"img{i}.jpg" for i in range(8)]
    assert dataset.n_captions == 16
    assert [s.reason.split(":")[0] for s in dataset.skipped] == [
        "invalid JSON",
        "row has no 'image' string",
        "captions.jsonl",
    ]
    assert dataset.skipped[2].item == "img9.jpg" and "no non-empty caption" in dataset.skipped[2].reason
    _, indices, skipped = decode_all(dataset, batch_size=3)
    assert indices == [0, 1, 2, 3, 4, 6, 7]
    assert [s.item for s in skipped] == ["img5.jpg"] and "FileNotFoundError" in skipped[0].reason


def test_captioned_rows_of_one_image_merge(tmp_path):
    rows = [
        {"image": "a.jpg", "captions": ["one"]},
        {"image": "b.jpg", "caption": "two"},
        {"image": "a.jpg", "captions": ["three"]},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = CaptionedImageSet(tmp_path / "c.jsonl", images_dir=tmp_path)
    assert dataset.images == ["a.jpg", "b.jpg"] and dataset.captions == [["one", "three"], ["two"]]


def test_heldout_split_is_disjoint_deterministic_and_sized(tmp_path):
    names = [f"photo_{i}.jpg" for i in range(400)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": n, "captions": ["x"]}) for n in names))
    train = CaptionedImageSet(tmp_path / "c.jsonl", split="train", heldout_fraction=0.25)
    heldout = CaptionedImageSet(tmp_path / "c.jsonl", split="heldout", heldout_fraction=0.25)
    assert set(train.images).isdisjoint(heldout.images)
    assert sorted(train.images + heldout.images) == sorted(names)
    assert 70 <= len(heldout) <= 130
    assert heldout.images == [n for n in names if is_heldout(n, 0.25)]
    assert (
        CaptionedImageSet(tmp_path / "c.jsonl", split="heldout", heldout_fraction=0.25, limit=10).images
        == heldout.images[:10]
    )
    with pytest.raises(ValueError, match="split"):
        CaptionedImageSet(tmp_path / "c.jsonl", split="test")
