"""MetaCLIP's part of the dataset card: entry frequency before and after balancing (a rank-frequency
plot on log-log axes, with ``t`` marked) and the entries the kept rows match most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from schemas.columns import KEEP_PROBABILITY, METACLIP_ENTRIES

#: Most points drawn per rank-frequency curve (log-spaced ranks beyond that).
MAX_POINTS = 2000
KEPT_ONLINE = "Kept to the end, expected per epoch"


@dataclass
class EntryFrequency:
    """Matches per MetaCLIP entry id before balancing (the balance stage's global counts) and
    among the rows kept to the end."""

    after: np.ndarray
    before: np.ndarray | None = None
    threshold: int | None = None

    @staticmethod
    def ranked(counts: np.ndarray) -> np.ndarray:
        """The non-zero counts, largest first: y of a rank-frequency plot."""
        return np.sort(counts[counts > 0])[::-1]

    def kept_share(self, head: bool) -> float | None:
        """Share of the matches of head (count above ``t``) or tail entries that were kept."""
        if self.before is None or self.threshold is None:
            return None
        size = max(len(self.before), len(self.after))
        before = np.pad(self.before, (0, size - len(self.before)))
        after = np.pad(self.after, (0, size - len(self.after)))
        chosen = before > self.threshold if head else (before > 0) & (before <= self.threshold)
        total = before[chosen].sum()
        return float(after[chosen].sum() / total) if total else None


def kept_entry_counts(view: Any) -> np.ndarray | None:
    """Matches per entry id among the rows kept to the end (a caption counts once per entry it
    matches), or with online balancing the matches an epoch is expected to use (each row weighted
    by its keep probability); None when the kept rows have no entries column."""
    online = KEEP_PROBABILITY in view.kept_columns()
    kept = view.kept([METACLIP_ENTRIES, KEEP_PROBABILITY] if online else [METACLIP_ENTRIES])
    if kept is None:
        return None
    weight = pl.col(KEEP_PROBABILITY).cast(pl.Float64) if online else pl.lit(1.0)
    counts = view.collect(
        kept.select(pl.col(METACLIP_ENTRIES).alias("entry"), weight.alias("weight"))
        .explode("entry")
        .drop_nulls("entry")
        .group_by("entry")
        .agg(pl.col("weight").sum())
    )
    ids, n = counts["entry"].to_numpy().astype(np.int64), counts["weight"].to_numpy()
    after = np.zeros(int(ids.max()) + 1 if len(ids) else 0, np.float64 if online else np.int64)
    after[ids] = n if online else np.rint(n).astype(np.int64)
    return after


def balance_section(view: Any, state: Any) -> str | None:
    """The balance stage's section from its aggregate (``counts`` per entry id, ``threshold``)."""
    if not (isinstance(state, dict) and isinstance(state.get("counts"), np.ndarray)):
        return None
    online = KEEP_PROBABILITY in view.kept_columns()
    after = kept_entry_counts(view)
    threshold = state.get("threshold")
    frequency = EntryFrequency(
        np.zeros(0, np.int64) if after is None else after,
        state["counts"].astype(np.int64),
        int(threshold) if threshold is not None else None,
    )
    if not (frequency.after.any() or frequency.before.any()):
        return None
    link = view.plot("entry-frequency.png", entry_frequency_figure(view, frequency, online), "MetaCLIP entry frequency")
    return f"{link}\n\n{balance_text(frequency, online)}"


def balance_text(frequency: EntryFrequency, online: bool = False) -> str:
    after = EntryFrequency.ranked(frequency.after)
    kept = (
        f"{KEPT_ONLINE if online else 'Kept to the end'}: {len(after):,} entries with {int(after.sum()):,} matches"
        f"{f', the largest {int(after[0]):,}' if len(after) else ''}."
    )
    before = EntryFrequency.ranked(frequency.before)
    t = frequency.threshold
    text = (
        f"Before balancing (the global counts of the balance stage): {len(before):,} entries with "
        f"{int(before.sum()):,} matches, the largest {int(before[0]) if len(before) else 0:,}. " + kept
    )
    if t is not None:
        head, tail = frequency.kept_share(head=True), frequency.kept_share(head=False)
        text += (
            f" Threshold t = {t:,}: {int((before > t).sum()):,} head entries (more than t matches) before, "
            f"{int((EntryFrequency.ranked(frequency.after) > t).sum()):,} after."
        )
        if head is not None:
            text += f" Head entries kept {head:.1%} of their matches"
            text += f", tail entries {tail:.1%}." if tail is not None else "."
        text += (
            " Online balancing: every row is kept with its keep probability, and each epoch of the bundled"
            " trainers uses about t of a head entry (a new draw every epoch) and all of a tail entry."
            if online
            else " Balancing keeps about t of a head entry and all of a tail entry; later stages drop rows of both."
        )
    return text


def top_entries_section(view: Any, entries: list[str], count: int = 10) -> str | None:
    """The entries the kept rows match most, by name (the match stage's section)."""
    after = kept_entry_counts(view)
    if after is None or not after.any():
        return None
    order = np.argsort(-after, kind="stable")[: min(count, int((after > 0).sum()))]
    listed = ", ".join(f"{view.cell(entries[i]) if i < len(entries) else f'#{i}'} {int(after[i]):,}" for i in order)
    return (
        f"The rows kept to the end match {int((after > 0).sum()):,} entries ({int(after.sum()):,} matches); "
        f"the most matched: {listed}."
    )


def entry_frequency_figure(view: Any, frequency: EntryFrequency, online: bool = False) -> Any:
    """Rank-frequency of MetaCLIP entries on log-log axes, before balancing and among kept rows
    (expected per epoch with online balancing), with the balancing threshold ``t`` marked."""
    figure = view.figure(7, 4)
    axes = figure.subplots()
    colours = view.colours
    curves = [
        ("before balancing", frequency.before, colours.before),
        (KEPT_ONLINE.lower() if online else "kept to the end", frequency.after, colours.kept),
    ]
    for label, counts, colour in curves:
        ranked = EntryFrequency.ranked(counts)
        if not len(ranked):
            continue
        ranks = log_spaced(len(ranked))
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
        view.log_ticks(axis)
    axes.set_xlabel("entry rank (most matched first)")
    axes.set_ylabel("matches (captions matching the entry)")
    axes.set_title("MetaCLIP entry frequency", fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def log_spaced(n: int) -> np.ndarray:
    """Every index below MAX_POINTS, else log-spaced indices (first and last included)."""
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, MAX_POINTS).astype(np.int64) - 1)
