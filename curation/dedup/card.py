"""A dedup stage's part of the dataset card: its duplicate clusters by size, drawn and told."""

from __future__ import annotations

from typing import Any


def cluster_bins(sizes: set[int], max_bars: int = 12) -> list[tuple[int, int]]:
    """Bars of a cluster-size plot as inclusive ``(low, high)`` sizes: one per size when there are
    few, else powers of two (2, 3-4, 5-8, ...)."""
    if len(sizes) <= max_bars:
        return [(s, s) for s in sorted(sizes)]
    top = max(sizes)
    bins, low = [(2, 2)], 3
    while low <= top:
        high = 2 * (low - 1)
        bins.append((low, high))
        low = high + 1
    return bins


def clusters_section(view: Any, keep: str) -> str | None:
    """The plot of the clusters the stage recorded (``size_histogram`` in its summary) and the facts."""
    summary = view.summary
    if not isinstance(summary, dict) or not isinstance(summary.get("size_histogram"), dict):
        return None
    clusters = {int(size): int(n) for size, n in summary["size_histogram"].items()}
    sizes = ", ".join(f"{n:,} of {size}" for size, n in sorted(clusters.items()))
    text = (
        f"{summary['duplicate_rows']:,} of {summary['rows']:,} rows were duplicates in "
        f"{summary['clusters']:,} clusters (survivor: `{keep}`); largest clusters: "
        f"{', '.join(map(str, summary['largest'])) or 'none'}; clusters by size: {sizes or 'none'}. "
        "A cluster of n rows keeps one (its survivor) and rejects n − 1; rejects name the survivor "
        "(`duplicate_of`) and the cluster's size in their detail."
    )
    if not clusters:
        return text
    figure = cluster_sizes_figure(view, clusters, summary["rows"], summary["duplicate_rows"])
    return f"{view.plot('cluster-sizes.png', figure, 'duplicate clusters by size')}\n\n{text}"


def cluster_sizes_figure(view: Any, clusters: dict[int, int], rows: int, duplicate_rows: int) -> Any:
    """Clusters per size (a log scale when the largest bar is more than 50 times the smallest)."""
    import numpy as np

    figure = view.figure(7, 3.8)
    axes = figure.subplots()
    bins = cluster_bins(set(clusters))
    x = np.arange(len(bins))
    heights = np.array([sum(n for size, n in clusters.items() if lo <= size <= hi) for lo, hi in bins])
    nonzero = heights[heights > 0]
    peak = int(nonzero.max()) if len(nonzero) else 1
    log = len(nonzero) > 0 and peak / nonzero.min() > 50
    bars = axes.bar(
        x,
        heights,
        width=0.6,
        color=view.colours.kept,
        label=f"{sum(clusters.values()):,} clusters, {duplicate_rows:,} of {rows:,} rows rejected",
    )
    axes.bar_label(bars, labels=[f"{h:,}" if h else "" for h in heights], fontsize=7, padding=1)
    if log:
        axes.set_yscale("log")
        view.log_ticks(axes.yaxis)
    axes.set_xticks(x, [str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in bins], fontsize=8)
    axes.set_xlabel("cluster size (rows in the cluster, survivor included)")
    axes.set_ylabel("clusters")
    axes.set_ylim(top=peak * (4 if log else 1.35))
    axes.set_title("Duplicate clusters by size", fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    return figure
