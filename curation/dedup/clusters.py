"""Duplicate clusters from pair edges, and which member of each cluster survives.

Edges (row i is a duplicate of row j) come from any detector: equal hashes, MinHash buckets
verified by Jaccard, faiss neighbours above a cosine. Clusters are the connected components of
the edge graph (so a chain a~b~c collapses to one cluster even when a and c differ more than
the threshold), computed with scipy's sparse-graph routine, never a Python loop per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Survivor policies: which row of a duplicate cluster is kept.
KEEP_FIRST = "first"  # the row that came first in the input (smallest source_index)
KEEP_HIGHEST_CLIP_SCORE = "highest_clip_score"
KEEP_LONGEST_CAPTION = "longest_caption"
KEEP_POLICIES = (KEEP_FIRST, KEEP_HIGHEST_CLIP_SCORE, KEEP_LONGEST_CAPTION)


def connected_components(num_rows: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Component label of every row (0..k-1, numbered by each component's smallest row)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    if num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(num_rows, num_rows))
    _, labels = components(graph, directed=False)
    # scipy numbers components by the first row it visits, which is the smallest row already;
    # renumber through the first occurrence anyway so the labels never depend on its traversal.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[labels].astype(np.int64)


@dataclass
class Clusters:
    """Every row's cluster, the chosen survivor of each cluster, and their sizes."""

    labels: np.ndarray  # cluster of each row
    survivor: np.ndarray  # for each row, the row that survives its cluster (itself if kept)
    sizes: np.ndarray  # size of each cluster, by label

    @property
    def duplicate(self) -> np.ndarray:
        return self.survivor != np.arange(len(self.survivor))

    def largest(self, count: int = 10) -> list[int]:
        """Sizes of the ``count`` largest clusters with more than one row, largest first."""
        sizes = np.sort(self.sizes[self.sizes > 1])[::-1]
        return sizes[:count].tolist()

    def size_histogram(self) -> dict[int, int]:
        """How many clusters have each size (sizes above 1 only)."""
        values, counts = np.unique(self.sizes[self.sizes > 1], return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


def choose_survivors(
    labels: np.ndarray, source_index: np.ndarray, preference: np.ndarray | None, fixed: np.ndarray | None = None
) -> Clusters:
    """Keep one row per cluster: a ``fixed`` row if the cluster has one (rows of an earlier run,
    already published), else the largest ``preference`` (ties and no preference: the smallest
    ``source_index``). The choice depends on values only, never on shard order."""
    n = len(labels)
    if n == 0:
        return Clusters(labels, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    pref = np.zeros(n) if preference is None else np.nan_to_num(np.asarray(preference, dtype=np.float64), nan=-np.inf)
    pinned = np.zeros(n, dtype=bool) if fixed is None else fixed
    # Sort by cluster, then pinned first, then preference descending, then source_index: the
    # first row of each cluster in this order is its survivor.
    order = np.lexsort((source_index, -pref, ~pinned, labels))
    sorted_labels = labels[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    winners = order[starts]  # one per cluster, in label order
    sizes = np.bincount(labels)
    return Clusters(labels, winners[labels], sizes)
