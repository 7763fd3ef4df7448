"""Image-text retrieval recall@k and the ROC AUC of the CLIP score for true versus shuffled pairs.

The ranking and AUC math are pure numpy functions over similarity matrices and score lists;
:func:`evaluate_retrieval` wires them to a CLIP and a :class:`CaptionedImageSet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.clip import ClipBundle
from models.evaluation.datasets import CaptionedImageSet
from models.evaluation.encode import encode_image_batches, encode_texts


def retrieval_ranks(similarity: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the right answers in both directions, from ``similarity`` ``(images, texts)``.

    ``text_to_image[j]`` is the image that text ``j`` describes. Image to text: the rank of the
    image's best-scoring own caption among the other images' captions. Text to image: the rank of
    the text's own image among all images. Ties count against the right answer, so a model that
    scores everything alike gets no credit.
    """
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    n_images, n_texts = similarity.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image needs one image index per text ({n_texts}), got {text_to_image.shape}")
    own = np.zeros((n_images, n_texts), dtype=bool)
    own[text_to_image, np.arange(n_texts)] = True
    if not own.any(axis=1).all():
        raise ValueError("every image needs at least one text")
    best_own = np.where(own, similarity, -np.inf).max(axis=1, keepdims=True)
    image_ranks = ((similarity >= best_own) & ~own).sum(axis=1)
    own_scores = similarity[text_to_image, np.arange(n_texts)]
    text_ranks = (similarity >= own_scores[None, :]).sum(axis=0) - 1
    return image_ranks, text_ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """The fraction of queries whose right answer ranks within the top ``k``, for each ``k``."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("recall of an empty query set is undefined")
    return {k: float((ranks < k).mean()) for k in ks}


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of scores for positives against negatives: Mann-Whitney U / (n_pos * n_neg).

    Tied scores get their average rank, so a positive tied with a negative counts one half.
    """
    positive = np.asarray(positive, dtype=np.float64).ravel()
    negative = np.asarray(negative, dtype=np.float64).ravel()
    if positive.size == 0 or negative.size == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    _, inverse, counts = np.unique(np.concatenate([positive, negative]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = average_rank[inverse[: positive.size]].sum()
    u = rank_sum - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation of ``range(n)`` with no fixed point (one cycle), fixed by ``seed``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    mapping = np.empty(n, dtype=np.int64)
    mapping[order] = np.roll(order, -1)
    return mapping


def pair_auc(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """ROC AUC of the CLIP score (cosine) of true pairs against shuffled pairs.

    Every text is scored with its own image (a true pair) and with the image that a seeded
    :func:`derangement` of the images maps its own image to (a shuffled pair: an image with a
    caption of a different image). Embeddings must be unit-norm. Returns ``auc`` and the mean
    scores of both kinds of pair.
    """
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    other_image = derangement(len(image_embeddings), seed)[text_to_image]
    true_scores = np.einsum("nd,nd->n", image_embeddings[text_to_image], text_embeddings)
    shuffled_scores = np.einsum("nd,nd->n", image_embeddings[other_image], text_embeddings)
    return {
        "auc": roc_auc(true_scores, shuffled_scores),
        "mean_true_score": float(true_scores.mean()),
        "mean_shuffled_score": float(shuffled_scores.mean()),
    }


def evaluate_retrieval(
    bundle: ClipBundle,
    captioned_set: CaptionedImageSet,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k both ways and the true-vs-shuffled pair AUC of ``bundle`` on ``captioned_set``.

    Images that cannot be decoded are left out with their captions. Returns a JSON-ready dict:
    ``image_to_text`` and ``text_to_image`` (``{"R@k": recall}``; an image counts as found when
    any of its captions ranks in the top k), ``pair_auc`` (see :func:`pair_auc`, with ``seed``),
    ``n_images``, ``n_texts``, ``n_skipped`` and ``skipped`` (``{"item", "reason"}``).
    """
    images, indices, skipped = encode_image_batches(
        bundle, captioned_set.batches(bundle.preprocess, batch_size), device
    )
    skipped = captioned_set.skipped + skipped
    if len(indices) < 2:
        raise ValueError(f"retrieval needs at least 2 decoded images, got {len(indices)} ({len(skipped)} skipped)")
    texts = [caption for i in indices for caption in captioned_set.captions[i]]
    text_to_image = np.repeat(np.arange(len(indices)), [len(captioned_set.captions[i]) for i in indices])
    text_embeddings = encode_texts(bundle, texts, device=device)
    image_ranks, text_ranks = retrieval_ranks(images @ text_embeddings.T, text_to_image)
    return {
        "image_to_text": {f"R@{k}": r for k, r in recall_at_k(image_ranks, ks).items()},
        "text_to_image": {f"R@{k}": r for k, r in recall_at_k(text_ranks, ks).items()},
        "pair_auc": pair_auc(images, text_embeddings, text_to_image, seed=seed),
        "n_images": len(indices),
        "n_texts": len(texts),
        "n_skipped": len(skipped),
        "skipped": [s.as_dict() for s in skipped],
    }
