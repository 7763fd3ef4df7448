"""The transformers export: LlavaForConditionalGeneration and its processor load, match our logits, generate."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from models.llava import load_llava, pixels
from models.llava_hf import NotExportable, export_hf
from models.llava_text import encode_prompt
from tests.http_server import make_image


def test_the_exported_folder_loads_in_transformers_and_gives_our_logits(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    bundle = load_llava("tiny-vit-llama")
    torch.nn.init.normal_(bundle.model.projector[2].weight, std=0.5)  # a projector that matters to the output
    folder = export_hf(bundle, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)

    image_bytes = make_image(48, 40, seed=3)
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}]
    messages = [{"role": "user", "content": "<image>\nWhat is this?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(io.BytesIO(image_bytes)), text=prompt, return_tensors="pt")
    model = bundle.model
    ids = torch.tensor(
        [encode_prompt(bundle.tokenizer, turns, image_token_id=model.image_token_id, image_tokens=model.image_tokens)]
    )
    assert inputs["input_ids"].tolist() == ids.tolist()  # the processor expands <image> as we do
    ours_pixels = pixels(bundle, [image_bytes])
    # Both pad the 48 x 40 image to a square of the mean colour; PIL's and torchvision's resizes
    # differ a little, most at the edge between the image and the padding.
    difference = (inputs["pixel_values"] - ours_pixels).abs()
    assert difference.mean() < 5e-3 and difference.max() < 5e-2
    with torch.no_grad():
        ours = model(ours_pixels, ids, torch.ones_like(ids)).logits
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ours_pixels).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    generated = hf.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_a_cnn_tower_is_refused_with_the_reason():
    with pytest.raises(NotExportable, match="not a ViT"):
        export_hf(load_llava("tiny-effnet-llama"), "unused")
