"""Evaluating the VLM on held-out images: caption loss, generated captions, an object-presence probe.

:func:`caption_loss` is the mean negative log-likelihood per supervised token of held-out
conversations (captions as stage-1 records, with the template the tokenizer carries), the number
that says whether a training stage generalises. :func:`generate_captions` asks the model for a
caption of each image, greedily, with the same template's prompt. :func:`evaluate_captions` puts
both together with BLEU-4 and CIDEr-D against the references (and CHAIR where the images' objects
are known: n-gram scores reward a caption's template whatever objects it names); :func:`evaluate_probe` runs the
POPE-style yes/no probe. ``vlmcurate eval vlm`` prints what they return. Images that cannot be
read are listed with their reason, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.evaluation.caption_metrics import bleu4, cider_d
from models.evaluation.chair import chair_scores
from models.evaluation.datasets import CaptionedImageSet, Skipped
from models.evaluation.pope import SETTINGS, BoxedImageSet, probe_questions, probe_scores
from models.llava import LlavaBundle, pixels
from models.llava_text import IGNORE_INDEX, collate, encode_conversation, encode_prompt
from schemas.llava import HUMAN, IMAGE_TOKEN, caption_turns


@torch.no_grad()
def caption_loss(
    bundle: LlavaBundle, samples: Sequence[tuple[bytes, list[dict[str, Any]]]], batch_size: int = 16
) -> float:
    """Token-weighted mean NLL of the assistant turns of ``(image bytes, turns)`` samples."""
    model = bundle.model
    device = next(model.projector.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        encoded = [
            encode_conversation(
                bundle.tokenizer,
                turns,
                image_token_id=model.image_token_id,
                image_tokens=model.image_tokens,
                max_length=bundle.config.max_length,
            )
            for _, turns in chunk
        ]
        batch = {k: v.to(device) for k, v in collate(encoded, bundle.tokenizer.pad_token_id).items()}
        mean_nll = model(
            pixels(bundle, [image for image, _ in chunk]).to(device),
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total, tokens = total + float(mean_nll) * supervised, tokens + supervised
    model.train(was_training)
    return total / max(tokens, 1)


@torch.no_grad()
def generate_answers(
    bundle: LlavaBundle, prompts: Sequence[tuple[bytes, str]], *, max_new_tokens: int = 30
) -> list[str]:
    """A greedy reply per ``(image bytes, instruction)``: the instruction follows the image in the human turn."""
    model, tokenizer = bundle.model, bundle.tokenizer
    device = next(model.projector.parameters()).device
    was_training = model.training
    model.eval()
    replies = []
    for data, instruction in prompts:  # one at a time: prompts of one length need no padding
        value = f"{IMAGE_TOKEN}\n{instruction}" if instruction else IMAGE_TOKEN
        ids = encode_prompt(
            tokenizer,
            [{"from": HUMAN, "value": value}],
            image_token_id=model.image_token_id,
            image_tokens=model.image_tokens,
        )
        input_ids = torch.tensor([ids], device=device)
        new = model.generate(
            pixels(bundle, [data]).to(device),
            input_ids,
            torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies.append(tokenizer.decode(new[0], skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


def generate_captions(
    bundle: LlavaBundle, images: Sequence[bytes], *, instruction: str = "", max_new_tokens: int = 30
) -> list[str]:
    """A greedy caption per image (``instruction`` follows the image in the human turn)."""
    return generate_answers(bundle, [(data, instruction) for data in images], max_new_tokens=max_new_tokens)


def evaluate_captions(
    bundle: LlavaBundle,
    images: CaptionedImageSet,
    *,
    instruction: str = "",
    show: int = 5,
    max_new_tokens: int = 30,
    objects: Mapping[str, frozenset[str]] | None = None,
    vocabulary: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Held-out caption loss over every reference, and BLEU-4 / CIDEr-D of a generated caption per image.

    With ``objects`` (each image's object names, by image name, e.g. a :class:`BoxedImageSet`'s),
    ``"objects"`` holds the CHAIR scores (:mod:`models.evaluation.chair`) of the captions of those
    images, against ``vocabulary`` (the full label set, if known)."""
    readable, kept, skipped = _readable(bundle, images.images, images.images_dir, images.skipped)
    references, names = [images.captions[i] for i in kept], [images.images[i] for i in kept]
    if not readable:
        raise ValueError(f"no readable image in {images.jsonl} ({len(skipped)} skipped)")
    loss = caption_loss(
        bundle, [(data, caption_turns(text)) for data, texts in zip(readable, references) for text in texts]
    )
    generated = generate_captions(bundle, readable, instruction=instruction, max_new_tokens=max_new_tokens)
    boxed = [(text, objects[name]) for name, text in zip(names, generated) if name in objects] if objects else []
    return {
        "images": len(readable),
        "references": sum(len(r) for r in references),
        "caption_loss": loss,
        "bleu4": bleu4(generated, references),
        "cider_d": cider_d(generated, references),
        **({"objects": chair_scores(*zip(*boxed), vocabulary)} if boxed else {}),
        "examples": [
            {"image": name, "generated": text, "references": refs}
            for name, text, refs in list(zip(names, generated, references))[:show]
        ],
        "skipped": [s.as_dict() for s in skipped],
    }


def evaluate_probe(
    bundle: LlavaBundle, boxed: BoxedImageSet, *, settings: Sequence[str] = SETTINGS, per_image: int = 3, seed: int = 0
) -> dict[str, Any]:
    """POPE-style yes/no scores per absent-object setting (:mod:`models.evaluation.pope`)."""
    readable, kept, skipped = _readable(bundle, boxed.images, boxed.images_dir, boxed.skipped)
    if not readable:
        raise ValueError(f"no readable image in {boxed.jsonl} ({len(skipped)} skipped)")
    objects = [boxed.objects[i] for i in kept]
    result: dict[str, Any] = {"images": len(readable), "skipped": [s.as_dict() for s in skipped]}
    for setting in settings:
        questions = probe_questions(objects, setting, per_image=per_image, seed=seed)
        replies = generate_answers(bundle, [(readable[q.image], q.text) for q in questions], max_new_tokens=3)
        result[setting] = probe_scores(questions, replies)
    return result


def _readable(
    bundle: LlavaBundle, names: Sequence[str], folder: Path, skipped: Sequence[Skipped]
) -> tuple[list[bytes], list[int], list[Skipped]]:
    """The bytes of the images that decode, their indices in ``names``, and the skipped ones with reasons."""
    readable, kept, left_out = [], [], list(skipped)
    for index, name in enumerate(names):
        try:
            data = (folder / name).read_bytes()
            pixels(bundle, [data])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            left_out.append(Skipped(name, f"{type(exc).__name__}: {exc}"))
            continue
        readable.append(data)
        kept.append(index)
    return readable, kept, left_out
