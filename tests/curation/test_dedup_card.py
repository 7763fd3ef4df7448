"""A dedup stage's card section helpers."""

from __future__ import annotations

from curation.dedup.card import cluster_bins


def test_cluster_bins_are_sizes_or_powers_of_two():
    assert cluster_bins({2, 3, 7}) == [(2, 2), (3, 3), (7, 7)]
    assert cluster_bins(set(range(2, 40))) == [(2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64)]
