"""Evaluating the VLM on held-out images: caption loss and generated captions.

:func:`caption_loss` is the mean negative log-likelihood per supervised token of held-out
conversations (captions as stage-1 records, with the template the tokenizer carries), the number
that says whether a training stage generalises. :func:`generate_captions` asks the model for a
caption of each image, greedily, with the same template's prompt.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from models.llava import LlavaBundle
from models.llava_text import collate, encode_conversation, encode_prompt
from schemas.llava import HUMAN, IMAGE_TOKEN


def pixels(bundle: LlavaBundle, images: Sequence[bytes]) -> torch.Tensor:
    """Encoded images as the model's input batch (its tower's eval transform)."""
    tensors = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            tensors.append(bundle.preprocess(image.convert("RGB")))
    return torch.stack(tensors)


@torch.no_grad()
def caption_loss(bundle: LlavaBundle, samples: Sequence[tuple[bytes, list[dict[str, Any]]]],
                 batch_size: int = 16) -> float:
    """Token-weighted mean NLL of the assistant turns of ``(image bytes, turns)`` samples."""
    model = bundle.model
    device = next(model.projector.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        encoded = [encode_conversation(bundle.tokenizer, turns, image_token_id=model.image_token_id,
                                       image_tokens=model.image_tokens, max_length=bundle.config.max_length)
                   for _, turns in chunk]
        batch = {k: v.to(device) for k, v in collate(encoded, bundle.tokenizer.pad_token_id).items()}
        logits = model(pixels(bundle, [image for image, _ in chunk]).to(device), batch["input_ids"],
                       batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                reduction="sum")
        total, tokens = total + float(nll), tokens + int((targets != -100).sum())
    model.train(was_training)
    return total / max(tokens, 1)


@torch.no_grad()
def generate_captions(bundle: LlavaBundle, images: Sequence[bytes], *, instruction: str = "",
                      max_new_tokens: int = 30) -> list[str]:
    """A greedy caption per image (``instruction`` follows the image in the human turn)."""
    model, tokenizer = bundle.model, bundle.tokenizer
    device = next(model.projector.parameters()).device
    was_training = model.training
    model.eval()
    value = f"{IMAGE_TOKEN}\n{instruction}" if instruction else IMAGE_TOKEN
    captions = []
    for data in images:  # one at a time: prompts of one length need no padding
        ids = encode_prompt(tokenizer, [{"from": HUMAN, "value": value}], image_token_id=model.image_token_id,
                            image_tokens=model.image_tokens)
        input_ids = torch.tensor([ids], device=device)
        new = model.generate(pixels(bundle, [data]).to(device), input_ids, torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        captions.append(tokenizer.decode(new[0], skip_special_tokens=True).strip())
    model.train(was_training)
    return captions
