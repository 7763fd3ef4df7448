"""VLM evaluation: the held-out caption loss is the LM's own token-mean loss; captions, metrics and the probe."""

from __future__ import annotations

import json

import pytest
import torch

from models.evaluation.datasets import CaptionedImageSet
from models.evaluation.pope import BoxedImageSet
from models.evaluation.vlm import caption_loss, evaluate_captions, evaluate_probe, generate_captions
from models.llava import load_llava, pixels
from models.llava_text import collate, encode_conversation, encode_prompt, prepare_tokenizer
from schemas.llava import caption_turns
from tests.http_server import make_image
from tests.models.test_llava import argmax_decode


def test_caption_loss_is_the_token_weighted_mean_the_model_reports():
    bundle = load_llava("tiny-vit-llama")
    prepare_tokenizer(bundle.tokenizer, "plain")
    samples = [(make_image(40, 40, seed=i), caption_turns(c)) for i, c in enumerate(["a red kite", "two cats"])]
    loss = caption_loss(bundle, samples, batch_size=1)
    model = bundle.model
    per_sample = []
    for image, turns in samples:
        encoded = encode_conversation(
            bundle.tokenizer,
            turns,
            image_token_id=model.image_token_id,
            image_tokens=model.image_tokens,
            max_length=256,
        )
        batch = collate([encoded], bundle.tokenizer.pad_token_id)
        with torch.no_grad():
            out = model(pixels(bundle, [image]), batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        per_sample.append((float(out.loss), int((batch["labels"][:, 1:] != -100).sum())))
    expected = sum(value * n for value, n in per_sample) / sum(n for _, n in per_sample)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert caption_loss(bundle, samples, batch_size=2) == pytest.approx(loss, rel=1e-4)  # padding changes nothing


def test_generated_captions_are_the_greedy_continuation_of_the_prompt_every_time():
    bundle = load_llava("tiny-vit-llama")
    prepare_tokenizer(bundle.tokenizer, "plain")
    images = [make_image(40, 40, seed=i) for i in range(2)]
    captions = generate_captions(bundle, images, max_new_tokens=5)
    assert generate_captions(bundle, images, max_new_tokens=5) == captions
    model = bundle.model.eval()
    prompt = torch.tensor(
        [
            encode_prompt(
                bundle.tokenizer,
                [{"from": "human", "value": "<image>"}],
                image_token_id=model.image_token_id,
                image_tokens=model.image_tokens,
            )
        ]
    )
    expected = [
        bundle.tokenizer.decode(
            argmax_decode(model, pixels(bundle, [image]), prompt, 5), skip_special_tokens=True
        ).strip()
        for image in images
    ]
    assert captions == expected and all(expected)


def _write_set(folder, rows, images):
    (folder / "images").mkdir(parents=True)
    for name, data in images.items():
        (folder / "images" / name).write_bytes(data)
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "set.jsonl"


def test_caption_evaluation_reports_loss_metrics_examples_and_unreadable_images(tmp_path):
    bundle = load_llava("tiny-vit-llama")
    prepare_tokenizer(bundle.tokenizer, "plain")
    rows = [
        {"image": "a.jpg", "captions": ["a red kite", "a kite in the sky"]},
        {"image": "b.jpg", "captions": ["two cats"]},
        {"image": "broken.jpg", "captions": ["nothing"]},
    ]
    jsonl = _write_set(
        tmp_path,
        rows,
        {"a.jpg": make_image(40, 40, seed=0), "b.jpg": make_image(40, 40, seed=1), "broken.jpg": b"not an image"},
    )
    result = evaluate_captions(bundle, CaptionedImageSet(jsonl), show=1, max_new_tokens=4)
    assert result["images"] == 2 and result["references"] == 3
    assert result["caption_loss"] > 0 and 0 <= result["bleu4"] <= 1 and result["cider_d"] >= 0
    assert [e["image"] for e in result["examples"]] == ["a.jpg"]
    assert result["examples"][0]["references"] == ["a red kite", "a kite in the sky"]
    assert [s["item"] for s in result["skipped"]] == ["broken.jpg"]
    assert "objects" not in result


def test_caption_evaluation_scores_the_objects_named_in_captions_of_images_with_known_objects(tmp_path):
    bundle = load_llava("tiny-vit-llama")
    prepare_tokenizer(bundle.tokenizer, "plain")
    rows = [{"image": "a.jpg", "captions": ["a kite"]}, {"image": "b.jpg", "captions": ["a cat"]}]
    jsonl = _write_set(tmp_path, rows, {"a.jpg": make_image(40, 40, seed=0), "b.jpg": make_image(40, 40, seed=1)})
    objects = {"a.jpg": frozenset({"kite"}), "missing.jpg": frozenset({"cat"})}
    result = evaluate_captions(bundle, CaptionedImageSet(jsonl), show=0, max_new_tokens=4, objects=objects)
    assert result["objects"]["captions"] == 1  # only a.jpg is both evaluated and boxed


def test_probe_evaluation_scores_every_setting_on_balanced_questions(tmp_path):
    bundle = load_llava("tiny-vit-llama")
    rows = [
        {"image": f"{i}.jpg", "objects": objects}
        for i, objects in enumerate([["dog", "ball"], ["cat"], ["dog", "car"]])
    ]
    jsonl = _write_set(tmp_path, rows, {f"{i}.jpg": make_image(40, 40, seed=i) for i in range(3)})
    result = evaluate_probe(bundle, BoxedImageSet(jsonl), settings=("random", "adversarial"), per_image=1)
    assert result["images"] == 3 and set(result) == {"images", "skipped", "random", "adversarial"}
    for setting in ("random", "adversarial"):
        scores = result[setting]
        assert scores["questions"] == 6 and 0 <= scores["accuracy"] <= 1
        assert scores["unanswered"] <= 6
