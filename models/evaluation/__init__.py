"""Evaluation of CLIP models: zero-shot classification, image-text retrieval and pair AUC.

Readers stream images a batch at a time and report every image or row they leave out; the
metrics are pure numpy functions over embeddings and scores.
"""

from models.evaluation.datasets import Batch, CaptionedImageSet, LabelledImageSet, Skipped, is_heldout
from models.evaluation.encode import encode_image_batches, encode_texts
from models.evaluation.retrieval import (
    derangement,
    evaluate_retrieval,
    pair_auc,
    recall_at_k,
    retrieval_ranks,
    roc_auc,
)
from models.evaluation.templates import TEMPLATES, fill_templates, prettify_classname
from models.evaluation.zeroshot import (
    class_prototypes,
    evaluate_zeroshot,
    per_class_accuracy,
    topk_accuracy,
    true_class_ranks,
    zeroshot_classifier,
)

__all__ = [
    "TEMPLATES",
    "Batch",
    "CaptionedImageSet",
    "LabelledImageSet",
    "Skipped",
    "class_prototypes",
    "derangement",
    "encode_image_batches",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "fill_templates",
    "is_heldout",
    "pair_auc",
    "per_class_accuracy",
    "prettify_classname",
    "recall_at_k",
    "retrieval_ranks",
    "roc_auc",
    "true_class_ranks",
    "topk_accuracy",
    "zeroshot_classifier",
]
