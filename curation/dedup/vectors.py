"""Nearest neighbours of unit vectors with faiss: exact for small pools, IVF for large ones.

Inner product of L2-normalised vectors is their cosine. ``exact`` (``IndexFlatIP``) compares
every pair; ``ivf`` (``IndexIVFFlat``, ``nlist`` ~ 4 sqrt(n) clusters trained on a seeded
sample, ``nprobe`` of them searched per query) trades a measured recall for speed
(``benchmarks/dedup.py`` reports both). A GPU is used when faiss was installed with GPU
support (the ``gpu`` extra) and one is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INDEX_KINDS = ("auto", "exact", "ivf")


@dataclass(frozen=True)
class SearchSettings:
    """How neighbours are searched; see the module docstring."""

    index: str = "auto"
    exact_max_rows: int = 50_000
    neighbours: int = 16
    nprobe: int = 16
    nlist: int | None = None
    seed: int = 0
    use_gpu: bool = True

    def __post_init__(self) -> None:
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.neighbours < 2:
            raise ValueError(f"neighbours must be >= 2 (a row finds itself first), got {self.neighbours}")


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (a zero row stays zero)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def similar_pairs(
    vectors: np.ndarray, threshold: float, settings: SearchSettings, queries: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pairs ``(q, v)`` with cosine >= ``threshold`` among each query's ``neighbours`` nearest
    vectors; with no ``queries`` the vectors query themselves and each pair comes once (q < v).
    Returns the pairs and what was searched (index kind, nlist, nprobe, device)."""
    import faiss

    self_search = queries is None
    queries = vectors if self_search else queries
    n, dim = vectors.shape
    facts = {"faiss_index": "exact", "device": "cpu"}
    if n == 0 or len(queries) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), facts
    use_ivf = settings.index == "ivf" or (settings.index == "auto" and n > settings.exact_max_rows)
    if use_ivf:
        nlist = settings.nlist or max(1, int(4 * math.sqrt(n)))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(settings.seed).permutation(n)[: max(nlist * 64, 10_000)]
        index.cp.seed = settings.seed
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(settings.nprobe, nlist)
        facts = {"faiss_index": "ivf", "nlist": nlist, "nprobe": index.nprobe, "device": "cpu"}
    else:
        index = faiss.IndexFlatIP(dim)
    if settings.use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
        facts["device"] = "gpu"
    index.add(vectors)
    k = min(settings.neighbours, n)
    similarity, neighbour = index.search(queries, k)
    query = np.repeat(np.arange(len(queries)), k)
    neighbour, similarity = neighbour.ravel(), similarity.ravel()
    keep = (neighbour >= 0) & (similarity >= threshold)
    if self_search:
        keep &= neighbour != query
    left, right = query[keep], neighbour[keep].astype(np.int64)
    if self_search and len(left):
        pairs = np.unique(np.stack([np.minimum(left, right), np.maximum(left, right)], axis=1), axis=0)
        left, right = pairs[:, 0], pairs[:, 1]
    return left.astype(np.int64), right, facts
