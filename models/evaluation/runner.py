"""Evaluation driven by settings (the trainer's periodic evaluation and ``vlmcurate eval``)."""

from __future__ import annotations

from typing import Any

from models.evaluation.datasets import CaptionedImageSet, LabelledImageSet
from models.evaluation.retrieval import evaluate_retrieval
from models.evaluation.zeroshot import evaluate_zeroshot


def evaluate_settings(bundle: Any, settings: Any, device: Any = None) -> dict[str, float]:
    """Flat metrics for the sets named in ``settings`` (an ``EvalSettings``): zero-shot top-k on
    ``zeroshot``; recall@k and pair AUC on the held-out split of ``retrieval``."""
    metrics: dict[str, float] = {}
    if settings is None:
        return metrics
    if settings.zeroshot:
        result = evaluate_zeroshot(
            bundle, LabelledImageSet(settings.zeroshot, per_class=settings.zeroshot_per_class), device=device
        )
        metrics.update({f"zeroshot_{k}": float(result[k]) for k in ("top1", "top5") if k in result})
    if settings.retrieval:
        captioned = CaptionedImageSet(
            settings.retrieval, settings.retrieval_images, split="heldout", limit=settings.retrieval_limit
        )
        result = evaluate_retrieval(bundle, captioned, ks=(1, 5), device=device)
        metrics.update({f"image_to_text_{k}": float(v) for k, v in result["image_to_text"].items()})
        metrics.update({f"text_to_image_{k}": float(v) for k, v in result["text_to_image"].items()})
        metrics["pair_auc"] = float(result["pair_auc"]["auc"])
    return metrics
