"""BLIP loading: tiny configs build offline, the tokenizer matches BLIP's, both heads run."""

from __future__ import annotations

import pytest
import torch

from models.blip import DECODER_START, ENCODER_START, blip_tokenizer, load_blip


def test_the_offline_tokenizer_is_blips():
    tokenizer = blip_tokenizer()
    assert tokenizer.convert_tokens_to_ids([DECODER_START, ENCODER_START]) == [30522, 30523]
    assert tokenizer.bos_token == DECODER_START and len(tokenizer) == 30524
    ids = tokenizer("A Dog on the Beach").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "dog", "on", "the", "beach", "[SEP]"]


def test_tiny_captioner_generates_from_the_prompt():
    bundle = load_blip("caption", "config:blip-tiny")
    pixels = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    prompt = bundle.tokenizer(["a picture of"] * 2, return_tensors="pt")
    with torch.inference_mode():
        out = bundle.model.generate(pixel_values=pixels, input_ids=prompt.input_ids[:, :-1], max_new_tokens=5)
    assert out.shape[0] == 2 and out.shape[1] > prompt.input_ids.shape[1] - 1
    assert (out[:, 0] == 30522).all()  # generation starts from [DEC], as BLIP's captioner does


def test_tiny_itm_head_gives_two_way_logits_and_a_seeded_init():
    first, again = load_blip("itm", "config:blip-tiny"), load_blip("itm", "config:blip-tiny")
    tokens = first.tokenizer(["a dog", "a red car on a road"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, first.image_size, first.image_size)
    with torch.inference_mode():
        logits = first.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels, use_itm_head=True
        ).itm_score
        repeat = again.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels, use_itm_head=True
        ).itm_score
    assert logits.shape == (2, 2) and torch.equal(logits, repeat)


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown BLIP config"):
        load_blip("caption", "config:blip-huge")
    with pytest.raises(ValueError, match="task must be one of"):
        load_blip("vqa", "config:blip-tiny")
