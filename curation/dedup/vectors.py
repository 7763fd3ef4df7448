"""Nearest neighbours of unit vectors with faiss: exact search within a cell, k-means cells.

Inner product of L2-normalised vectors is their cosine. :func:`similar_pairs` compares every
vector of a set with every other (``IndexFlatIP``) and keeps each one's ``neighbours`` nearest;
:func:`kmeans_cells` and :func:`nearest_cells` split a large pool into cells SemDeDup-style, so
that the exact search runs cell by cell. A GPU is used when faiss was installed with GPU support
(the ``gpu`` extra) and one is visible.
"""

from __future__ import annotations

import numpy as np

#: k-means iterations; faiss's default of 25 gains nothing measurable for cells that only group.
KMEANS_ITERATIONS = 20


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (a zero row stays zero)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def gpu_visible() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def similar_pairs(vectors: np.ndarray, threshold: float, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, each once, with cosine >= ``threshold`` among each vector's
    ``neighbours`` nearest (itself included), by exact search."""
    import faiss

    n, dim = vectors.shape
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = faiss.IndexFlatIP(dim)
    if gpu_visible():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    k = min(neighbours, n)
    similarity, neighbour = index.search(vectors, k)
    query = np.repeat(np.arange(n), k)
    neighbour, similarity = neighbour.ravel(), similarity.ravel()
    keep = (neighbour >= 0) & (similarity >= threshold) & (neighbour != query)
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    left, right = query[keep], neighbour[keep].astype(np.int64)
    pairs = np.unique(np.stack([np.minimum(left, right), np.maximum(left, right)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def kmeans_cells(vectors: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """``cells`` spherical k-means centroids (unit rows, float32) of ``vectors``, seeded."""
    import faiss

    kmeans = faiss.Kmeans(
        vectors.shape[1], cells, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, gpu=gpu_visible(), verbose=False
    )
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return unit_rows(kmeans.centroids)


def nearest_cells(vectors: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` nearest centroids of each vector by cosine, nearest first: (rows, count)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, cells = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(count, len(centroids)))
    return cells.astype(np.int64)
