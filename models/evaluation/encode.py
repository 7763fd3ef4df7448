"""L2-normalised CLIP embeddings of texts and of image batches, as float32 numpy arrays."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.clip import ClipBundle
from models.evaluation.datasets import Batch, Skipped


def place_model(bundle: ClipBundle, device: str | torch.device | None) -> torch.device:
    """The device to run on: ``device`` (the model is moved there) or, if None, the model's own."""
    if device is None:
        return next(bundle.model.parameters()).device
    device = torch.device(device)
    bundle.model.to(device)
    return device


@torch.inference_mode()
def encode_texts(
    bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256, device: str | torch.device | None = None
) -> np.ndarray:
    """Unit-norm text embeddings, one row per text (shape ``(len(texts), embed_dim)``)."""
    device = place_model(bundle, device)
    bundle.model.eval()
    rows = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[start : start + batch_size])).to(device)
        rows.append(F.normalize(bundle.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
    return np.concatenate(rows)


@torch.inference_mode()
def encode_image_batches(
    bundle: ClipBundle, batches: Iterable[Batch], device: str | torch.device | None = None
) -> tuple[np.ndarray, list[int], list[Skipped]]:
    """Unit-norm embeddings of every decoded image, the set indices they belong to, and the skipped."""
    device = place_model(bundle, device)
    bundle.model.eval()
    dtype = next(bundle.model.parameters()).dtype
    rows = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    indices: list[int] = []
    skipped: list[Skipped] = []
    for batch in batches:
        skipped.extend(batch.skipped)
        if batch.indices:
            pixels = batch.pixels.to(device=device, dtype=dtype)
            rows.append(F.normalize(bundle.model.encode_image(pixels).float(), dim=-1).cpu().numpy())
            indices.extend(batch.indices)
    return np.concatenate(rows), indices, skipped
