"""Zero-shot classification: class prototypes from prompt templates, top-k accuracy over a labelled set.

The math (prototypes, ranks, accuracies) is in pure numpy functions that take embeddings or
scores, so it is testable without a model; :func:`evaluate_zeroshot` wires them to a CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.clip import ClipBundle
from models.evaluation.datasets import LabelledImageSet
from models.evaluation.encode import encode_image_batches, encode_texts
from models.evaluation.templates import TEMPLATES, fill_templates


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def class_prototypes(text_embeddings: np.ndarray) -> np.ndarray:
    """Class weights from prompt embeddings of shape ``(classes, templates, dim)``.

    Each prompt embedding is normalised, the templates of a class averaged and the mean
    normalised again: shape ``(classes, dim)``, unit rows.
    """
    if text_embeddings.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim) embeddings, got shape {text_embeddings.shape}")
    return _unit_rows(_unit_rows(text_embeddings.astype(np.float64)).mean(axis=1)).astype(np.float32)


def zeroshot_classifier(
    bundle: ClipBundle,
    classnames: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Unit-norm class weights ``(len(classnames), embed_dim)``: see :func:`class_prototypes`."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [prompt for name in classnames for prompt in fill_templates(name, templates)]
    embeddings = encode_texts(bundle, prompts, batch_size=batch_size, device=device)
    return class_prototypes(embeddings.reshape(len(classnames), len(templates), -1))


def true_class_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The 0-based rank of each row's true class among its scores ``(n, classes)``.

    Ties count against the true class (every other class scoring at least as high ranks
    above it), so a model that scores all classes alike gets no credit.
    """
    labels = np.asarray(labels, dtype=np.int64)
    true = scores[np.arange(len(labels)), labels][:, None]
    return (scores >= true).sum(axis=1) - 1


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """The fraction of rows whose true class ranks within the top ``k``, for each ``k`` in ``ks``."""
    if len(labels) == 0:
        raise ValueError("top-k accuracy of an empty set is undefined")
    ranks = true_class_ranks(scores, labels)
    return {k: float((ranks < k).mean()) for k in ks}


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 accuracy of each class (NaN for a class with no rows) and the row count of each class."""
    labels = np.asarray(labels, dtype=np.int64)
    hits = (true_class_ranks(scores, labels) == 0).astype(np.float64)
    counts = np.bincount(labels, minlength=n_classes)
    correct = np.bincount(labels, weights=hits, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / counts, counts


def evaluate_zeroshot(
    bundle: ClipBundle,
    dataset: LabelledImageSet,
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1 (and top-5 with at least 5 classes) accuracy of ``bundle`` on ``dataset``.

    Returns a JSON-ready dict: ``top1``, ``top5`` (if defined), ``n_images`` (decoded and
    scored), ``n_classes``, ``chance`` (``1 / n_classes``) and ``chance_top5``, ``per_class``
    (``{class: {"n_images", "top1"}}``, ``top1`` None for a class with no decoded image),
    ``n_skipped`` and ``skipped`` (``{"item", "reason"}`` of rows and images left out).
    """
    n_classes = len(dataset.classnames)
    weights = zeroshot_classifier(bundle, dataset.classnames, templates, device=device)
    images, indices, skipped = encode_image_batches(bundle, dataset.batches(bundle.preprocess, batch_size), device)
    skipped = dataset.skipped + skipped
    if not indices:
        raise ValueError(f"no image of {dataset.source} could be decoded ({len(skipped)} skipped)")
    labels = np.asarray(dataset.labels, dtype=np.int64)[indices]
    scores = images @ weights.T
    ks = (1, 5) if n_classes >= 5 else (1,)
    accuracy = topk_accuracy(scores, labels, ks)
    class_top1, counts = per_class_accuracy(scores, labels, n_classes)
    result: dict[str, Any] = {f"top{k}": accuracy[k] for k in ks}
    if 5 in ks:
        result["chance_top5"] = 5 / n_classes
    result.update(
        n_images=len(indices),
        n_classes=n_classes,
        chance=1 / n_classes,
        n_templates=len(templates),
        per_class={
            name: {"n_images": int(counts[c]), "top1": None if counts[c] == 0 else float(class_top1[c])}
            for c, name in enumerate(dataset.classnames)
        },
        n_skipped=len(skipped),
        skipped=[s.as_dict() for s in skipped],
    )
    return result
