"""The VLM: visual tokens from ViT and CNN towers, placed exactly at the image slots, configs checked."""

from __future__ import annotations

import pytest
import torch

from models.llava import LlavaConfig, load_llava, pixels
from models.llava_text import collate, encode_conversation
from tests.http_server import make_image

TURNS = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A test card."}]


def _batch(bundle, n: int = 2) -> dict[str, torch.Tensor]:
    model = bundle.model
    encoded = [
        encode_conversation(
            bundle.tokenizer,
            TURNS,
            image_token_id=model.image_token_id,
            image_tokens=model.image_tokens,
            max_length=256,
        )
        for _ in range(n)
    ]
    images = pixels(bundle, [make_image(48, 40, seed=i) for i in range(n)])
    return {"pixels": images, **collate(encoded, bundle.tokenizer.pad_token_id)}


@pytest.mark.parametrize(("name", "tokens", "vit"), [("tiny-vit-llama", 16, True), ("tiny-effnet-llama", 4, False)])
def test_visual_tokens_fill_exactly_the_image_slots(name, tokens, vit):
    bundle = load_llava(name)
    model = bundle.model
    assert model.image_tokens == tokens and model.vision.is_vit == vit
    batch = _batch(bundle)
    embeds = model.embed(batch["pixels"], batch["input_ids"])
    slots = batch["input_ids"] == model.image_token_id
    text = model.language_model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal(embeds[~slots], text[~slots])  # text positions untouched
    projected = model.projector(model.vision(batch["pixels"]))
    assert torch.allclose(embeds[slots].view(2, tokens, -1), projected)
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    logits = model(batch["pixels"], batch["input_ids"], batch["attention_mask"]).logits  # every position
    full = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, full, rtol=1e-5)  # the head ran on fewer positions
    assert out.logits.shape[1] < logits.shape[1]


@pytest.mark.parametrize("name", ["tiny-vit-llama", "tiny-effnet-llama"])
def test_merged_tokens_concatenate_each_block_of_neighbours(name):
    values = LlavaConfig.load(name).__dict__ | {"merge_tokens": 3}
    full, merged = load_llava(name).model, load_llava(values).model
    images = pixels(load_llava(name), [make_image(48, 40, seed=3)])
    tokens, side = full.vision(images)[0], int(full.image_tokens**0.5)  # a 4 x 4 or 2 x 2 grid, row by row
    assert merged.image_tokens == ((side + 2) // 3) ** 2 and merged.vision.width == 9 * full.vision.width
    first = merged.vision(images)[0, 0].view(full.vision.width, 3, 3)  # channel-major, as pixel_unshuffle packs
    assert torch.equal(first[:, 0, 0], tokens[0]) and torch.equal(first[:, 1, 1], tokens[side + 1])
    with pytest.raises(ValueError, match="merge_tokens"):
        LlavaConfig.load(values | {"merge_tokens": 0})


def test_the_tower_stays_frozen_and_in_eval_mode_while_training():
    model = load_llava("tiny-effnet-llama").model
    model.train()
    assert not model.vision.visual.training and model.projector.training
    assert not any(p.requires_grad for p in model.vision.parameters())


def argmax_decode(model, pixels: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy decoding of one sequence spelled out: the whole sequence through the model (no cache),
    its top next token appended, until the end-of-sequence token or ``max_new_tokens``."""
    eos = model.language_model.generation_config.eos_token_id
    table = model.language_model.get_input_embeddings()
    new: list[int] = []
    with torch.no_grad():
        embeds = model.embed(pixels, input_ids)
        while len(new) < max_new_tokens and (not new or new[-1] != eos):
            new.append(int(model.language_model(inputs_embeds=embeds).logits[0, -1].argmax()))
            embeds = torch.cat([embeds, table(torch.tensor([[new[-1]]]))], dim=1)
    return new


def test_a_sequence_without_its_image_slots_is_an_error_and_greedy_generation_returns_the_argmax_tokens():
    bundle = load_llava("tiny-vit-llama")
    bundle.model.eval()
    batch = _batch(bundle, n=1)
    with pytest.raises(ValueError, match="exactly 16 image tokens"):
        bundle.model.embed(batch["pixels"], batch["input_ids"][:, :-30].clone().fill_(5))
    new = bundle.model.generate(
        batch["pixels"], batch["input_ids"], batch["attention_mask"], max_new_tokens=6, do_sample=False
    )
    # New tokens only (not the prompt), each the model's most likely next token.
    assert new[0].tolist() == argmax_decode(bundle.model, batch["pixels"], batch["input_ids"], 6)


def test_configs_are_checked():
    with pytest.raises(ValueError, match="unknown VLM config"):
        LlavaConfig.load("no-such-model")
    with pytest.raises(ValueError, match="projector must be"):
        LlavaConfig.load({"vision": "tiny-vit", "language_model": "config:tiny-llama", "projector": "qformer"})
    with pytest.raises(ValueError, match="fields"):
        LlavaConfig.load({"vision": "tiny-vit", "language_model": "config:tiny-llama", "layers": 3})
    with pytest.raises(ValueError, match="image_aspect_ratio must be"):
        LlavaConfig.load({"vision": "tiny-vit", "language_model": "config:tiny-llama", "image_aspect_ratio": "fit"})


def test_a_wide_image_is_padded_to_a_square_of_the_mean_colour_so_its_sides_are_seen():
    import io

    from PIL import Image

    wide = Image.new("RGB", (64, 32), (250, 10, 10))
    for x in range(4):  # a dark band at each side edge: the part a centre crop cuts away
        for y in range(32):
            wide.putpixel((x, y), (0, 0, 0))
            wide.putpixel((63 - x, y), (0, 0, 0))
    data = io.BytesIO()
    wide.save(data, format="PNG")
    padded = load_llava("tiny-vit-llama")
    cropped = load_llava({**LlavaConfig.load("tiny-vit-llama").__dict__, "image_aspect_ratio": "crop"})
    square = pixels(padded, [data.getvalue()])[0]  # (3, 32, 32)
    assert square[:, :6, :].abs().max() < 0.05  # the band above the image: the mean colour, normalised to 0
    assert square[0, 16, 0] < square[0, 16, 16] - 1  # the dark left edge is in the input
    assert pixels(cropped, [data.getvalue()])[0][0, :, 0].min() > square[0, 16, 0] + 1  # cropped away
