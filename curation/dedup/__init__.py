"""Dedup stages: exact keys, near-duplicate captions (MinHash LSH), near-duplicate images and
image-text pairs (faiss over CLIP embeddings, in k-means cells for large pools). All are keyed
whole-pool stages that cluster duplicates across every shard where their keys meet and keep one
row per cluster under a configurable policy."""

from curation.dedup.caption import NEAR_DUPLICATE_CAPTION, CaptionNearDuplicates
from curation.dedup.exact import DUPLICATE, ExactDuplicates
from curation.dedup.image import NEAR_DUPLICATE_IMAGE, NEAR_DUPLICATE_PAIR, ImageNearDuplicates

__all__ = [
    "DUPLICATE",
    "NEAR_DUPLICATE_CAPTION",
    "NEAR_DUPLICATE_IMAGE",
    "NEAR_DUPLICATE_PAIR",
    "CaptionNearDuplicates",
    "ExactDuplicates",
    "ImageNearDuplicates",
]
