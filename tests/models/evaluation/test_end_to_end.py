"""Zero-shot and retrieval with the random tiny ViT: synthetic sets, then a few real CIFAR-10 and Flickr8k images."""

from __future__ import annotations

import pytest

from models.clip import load_clip
from models.evaluation import CaptionedImageSet, LabelledImageSet, evaluate_retrieval, evaluate_zeroshot
from tests.conftest import shared_path
from tests.models.evaluation.conftest import CLASS_SIZES

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def tiny_vit():
    return load_clip("tiny-vit")


def check_zeroshot(result: dict, n_images: int, n_classes: int) -> None:
    assert result["n_images"] == n_images and result["n_classes"] == n_classes
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["chance"] == pytest.approx(1 / n_classes)
    assert sum(c["n_images"] for c in result["per_class"].values()) == n_images
    hits = sum(c["top1"] * c["n_images"] for c in result["per_class"].values() if c["n_images"])
    assert hits == pytest.approx(result["top1"] * n_images)


def test_zeroshot_on_a_synthetic_folder(tiny_vit, image_folder):
    result = evaluate_zeroshot(tiny_vit, LabelledImageSet(image_folder), batch_size=4)
    check_zeroshot(result, sum(CLASS_SIZES.values()), len(CLASS_SIZES))
    assert result["n_skipped"] == 1 and result["skipped"][0]["item"] == "dog_house/broken.jpg"
    assert set(result["per_class"]) == set(CLASS_SIZES)


def test_zeroshot_reports_no_top5_under_five_classes(tiny_vit, image_folder):
    for name in ("dog_house", "eel", "fox"):
        for file in (image_folder / name).iterdir():
            file.unlink()
    result = evaluate_zeroshot(tiny_vit, LabelledImageSet(image_folder), templates=["a {}."])
    assert "top5" not in result and result["n_classes"] == 3 and result["n_templates"] == 1


def test_retrieval_on_a_synthetic_captioned_set(tiny_vit, captioned_jsonl):
    result = evaluate_retrieval(tiny_vit, CaptionedImageSet(captioned_jsonl), batch_size=3)
    assert result["n_images"] == 7 and result["n_texts"] == 14  # img5.jpg is missing
    assert result["n_skipped"] == 4  # 3 bad rows + the missing image
    for direction in ("image_to_text", "text_to_image"):
        recalls = [result[direction][f"R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1.0
    assert result["text_to_image"]["R@10"] == 1.0  # only 7 images to rank
    assert 0.0 <= result["pair_auc"]["auc"] <= 1.0


def test_zeroshot_on_a_few_real_cifar10_images(tiny_vit):
    dataset = LabelledImageSet(shared_path("cifar10", "test.tar"), per_class=3)
    assert dataset.classnames == CIFAR10
    result = evaluate_zeroshot(tiny_vit, dataset, batch_size=16)
    check_zeroshot(result, 30, 10)
    assert result["n_skipped"] == 0


def test_retrieval_on_a_few_real_flickr8k_images(tiny_vit):
    dataset = CaptionedImageSet(shared_path("flickr8k", "captions.jsonl"), split="heldout", limit=12)
    result = evaluate_retrieval(tiny_vit, dataset)
    assert result["n_images"] == 12 and result["n_texts"] == 60 and result["n_skipped"] == 0
