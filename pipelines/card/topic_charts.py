"""The dataset card's topic plots: the funnel, MetaCLIP entry frequency, dedup cluster sizes,
CapFilt caption sources and instruction types, each drawn from a :mod:`pipelines.card.queries`
result into PNG bytes."""

from __future__ import annotations

import numpy as np

from pipelines.card.figures import KEPT_COLOUR, new_figure, to_png
from pipelines.card.queries import CaptionSources, ClusterSizes, EntryFrequency, InstructionTypes

DROPPED_COLOUR, BEFORE_COLOUR, WARN_COLOUR = "#e03131", "#868e96", "#f08c00"
#: Most points drawn per rank-frequency curve (log-spaced ranks beyond that).
MAX_POINTS = 2000


def funnel_png(steps: list[tuple[str, int, int]]) -> bytes:
    """Horizontal bars, one per stage in order: rows kept, with the rows it rejected beside them.
    ``steps`` are ``(stage, rows in, rows kept)``."""
    figure = new_figure(8, 0.9 + 0.36 * len(steps))
    axes = figure.subplots()
    y = np.arange(len(steps))
    kept = np.array([s[2] for s in steps])
    dropped = np.array([s[1] - s[2] for s in steps])
    axes.barh(y, kept, color=KEPT_COLOUR, label="kept")
    axes.barh(y, dropped, left=kept, color=DROPPED_COLOUR, alpha=0.7, label="rejected")
    widest = max(int((kept + dropped).max()), 1)
    for i, (_, rows_in, rows_kept) in enumerate(steps):
        label = f"{rows_kept:,}" + (f"  (−{rows_in - rows_kept:,})" if rows_in > rows_kept else "")
        axes.text(rows_in + widest * 0.01, i, label, va="center", fontsize=8)
    axes.set_yticks(y, [s[0] for s in steps], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, widest * 1.25)
    axes.set_xlabel("rows")
    axes.set_title("Funnel: rows kept after each stage", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    return to_png(figure)


def entry_frequency_png(frequency: EntryFrequency) -> bytes:
    """Rank-frequency of MetaCLIP entries on log-log axes, before balancing and among kept rows,
    with the balancing threshold ``t`` marked."""
    figure = new_figure(7, 4)
    axes = figure.subplots()
    curves = [("before balancing", frequency.before, BEFORE_COLOUR), ("kept to the end", frequency.after, KEPT_COLOUR)]
    for label, counts, colour in curves:
        if counts is None:
            continue
        ranked = EntryFrequency.ranked(counts)
        if not len(ranked):
            continue
        ranks = _log_spaced(len(ranked))
        axes.plot(
            ranks + 1,
            ranked[ranks],
            color=colour,
            linewidth=1.6,
            marker="o" if len(ranks) <= 60 else None,
            markersize=3,
            label=f"{label}: {len(ranked):,} entries, {int(ranked.sum()):,} matches",
        )
    if frequency.threshold is not None:
        axes.axhline(
            frequency.threshold,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"threshold t = {frequency.threshold:,}",
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    for axis in (axes.xaxis, axes.yaxis):
        _plain_log_ticks(axis)
    axes.set_xlabel("entry rank (most matched first)")
    axes.set_ylabel("matches (captions matching the entry)")
    axes.set_title("MetaCLIP entry frequency", fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return to_png(figure)


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks as plain numbers (1, 10, 1,000), with 2 and 5 between decades too when
    the axis spans fewer than three (else it would show one label or none)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = axis.get_view_interval()
    subs = (1.0, 2.0, 5.0) if lo > 0 and hi / lo < 1000 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axis.set_minor_formatter(NullFormatter())


def compact(value: float) -> str:
    """A tick label: 7, 150, 2k, 30M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _log_spaced(n: int) -> np.ndarray:
    """Every index below MAX_POINTS, else log-spaced indices (first and last included)."""
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, MAX_POINTS).astype(np.int64) - 1)


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


def cluster_sizes_png(stages: list[ClusterSizes]) -> bytes:
    """Clusters per size (grouped bars, one colour per dedup stage; a log scale when the largest
    bar is more than 50 times the smallest)."""
    figure = new_figure(7, 3.8)
    axes = figure.subplots()
    bins = cluster_bins({size for s in stages for size in s.clusters})
    width = 0.8 / max(len(stages), 1)
    x = np.arange(len(bins))
    heights_by_stage = [
        np.array([sum(n for size, n in stage.clusters.items() if lo <= size <= hi) for lo, hi in bins])
        for stage in stages
    ]
    nonzero = np.concatenate([h[h > 0] for h in heights_by_stage]) if bins else np.zeros(0)
    peak = int(nonzero.max()) if len(nonzero) else 1
    log = len(nonzero) > 0 and peak / nonzero.min() > 50
    for i, (stage, heights) in enumerate(zip(stages, heights_by_stage)):
        bars = axes.bar(
            x + (i - (len(stages) - 1) / 2) * width,
            heights,
            width=width,
            label=f"{stage.stage}: {sum(stage.clusters.values()):,} clusters, "
            f"{stage.duplicate_rows:,} of {stage.rows:,} rows rejected",
        )
        axes.bar_label(bars, labels=[f"{h:,}" if h else "" for h in heights], fontsize=7, padding=1)
    if log:
        axes.set_yscale("log")
        _plain_log_ticks(axes.yaxis)
    axes.set_xticks(x, [str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in bins], fontsize=8)
    axes.set_xlabel("cluster size (rows in the cluster, survivor included)")
    axes.set_ylabel("clusters")
    axes.set_ylim(top=peak * (4 if log else 1.35))
    axes.set_title("Duplicate clusters by size", fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    return to_png(figure)


def caption_sources_png(sources: CaptionSources, threshold: float | None) -> bytes:
    """Left: kept rows by caption source and rows CapFilt rejected. Right (when scores exist):
    the web caption's score and the best synthetic caption's score, with the threshold."""
    from matplotlib.ticker import MaxNLocator

    has_scores = sources.edges is not None
    figure = new_figure(10 if has_scores else 6, 3.6)
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.4]) if has_scores else (figure.subplots(), None)
    labels = ["kept, web caption", "kept, synthetic caption", "rejected by CapFilt"]
    values = [sources.web, sources.synthetic, sources.rejected]
    bars = left.barh(labels, values, color=[BEFORE_COLOUR, KEPT_COLOUR, DROPPED_COLOUR])
    left.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8, padding=2)
    left.invert_yaxis()
    left.set_xlim(0, max(max(values), 1) * 1.25)
    left.tick_params(axis="y", labelsize=8)
    left.set_xlabel("rows")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_title("Captions chosen by CapFilt", fontsize=10)
    if right is not None:
        edges = sources.edges
        right.stairs(
            sources.web_scores,
            edges,
            color=BEFORE_COLOUR,
            linewidth=1.6,
            label=f"web caption ({int(sources.web_scores.sum()):,} rows)",
        )
        right.stairs(
            sources.best_synthetic_scores,
            edges,
            color=KEPT_COLOUR,
            linewidth=1.6,
            label=f"best synthetic caption ({int(sources.best_synthetic_scores.sum()):,} rows)",
        )
        if threshold is not None:
            right.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        right.set_xlabel("caption score (filter's units)")
        right.set_ylabel("rows")
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_title("Scores of every row the filter scored", fontsize=10)
        right.legend(fontsize=8, loc="best")
    return to_png(figure)


def instruction_types_png(types: InstructionTypes) -> bytes:
    """Left: records kept per response type. Right (when anything failed): rows rejected by
    reason, and response types that failed in rows kept for their others, by reason."""
    from matplotlib.ticker import MaxNLocator

    failures = _failure_reasons(types)
    figure = new_figure(10 if failures else 5.5, 3.6)
    left, right = figure.subplots(1, 2) if failures else (figure.subplots(), None)
    kinds = list(types.records)
    bars = left.bar(kinds, [types.records[k] for k in kinds], color=KEPT_COLOUR)
    left.bar_label(bars, labels=[f"{types.records[k]:,}" for k in kinds], fontsize=8, padding=1)
    left.set_ylim(top=max(types.records.values(), default=1) * 1.15)
    left.set_ylabel("records")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.tick_params(axis="x", labelsize=8)
    left.set_title(f"Records kept by response type ({types.rows:,} rows)", fontsize=10)
    if right is not None:
        reasons = list(failures)
        y = np.arange(len(reasons))
        rejected = np.array([failures[r][0] for r in reasons])
        failed = np.array([failures[r][1] for r in reasons])
        right.barh(
            y - 0.2,
            rejected,
            height=0.4,
            color=DROPPED_COLOUR,
            label=f"rows rejected ({int(rejected.sum()):,})" if rejected.any() else None,
        )
        right.barh(
            y + 0.2,
            failed,
            height=0.4,
            color=WARN_COLOUR,
            label=f"failed types in kept rows ({int(failed.sum()):,})" if failed.any() else None,
        )
        for i in range(len(reasons)):
            for offset, value in ((-0.2, rejected[i]), (0.2, failed[i])):
                if value:
                    right.text(value, i + offset, f" {value:,}", va="center", fontsize=7)
        right.set_yticks(y, reasons, fontsize=8)
        right.set_ylim(max(len(reasons), 3) - 0.5, -0.5)  # top to bottom; a lone reason is no slab
        right.set_xlim(0, max(int(rejected.max()), int(failed.max()), 1) * 1.25)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_xlabel("count")
        right.set_title("Failures by reason", fontsize=10)
        right.legend(fontsize=8, loc="lower right")
    return to_png(figure)


def _failure_reasons(types: InstructionTypes) -> dict[str, tuple[int, int]]:
    """reason -> (rows rejected, response types failed in kept rows), most frequent first."""
    reasons: dict[str, list[int]] = {}
    for reason, n in types.rejected.items():
        reasons.setdefault(reason, [0, 0])[0] += n
    for (_, reason), n in types.failed.items():
        reasons.setdefault(reason, [0, 0])[1] += n
    ordered = sorted(reasons.items(), key=lambda item: (-sum(item[1]), item[0]))
    return {reason: (a, b) for reason, (a, b) in ordered}
