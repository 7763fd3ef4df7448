"""CapFilt's part of the dataset card: kept rows by caption source, the rows the selection
rejected, the scores of the web and best synthetic captions against the threshold, and examples
of replaced captions with their images."""

from __future__ import annotations

from typing import Any

import polars as pl

from schemas.columns import CAPTION, CAPTION_SCORES, CAPTION_SOURCE, IMAGE, SELECTED_CAPTIONS, WEB_CAPTION


def selection_section(view: Any, threshold: float, policy: str) -> str | None:
    """What the caption selection did, from the kept rows' ``caption_source`` and the scores of
    every row it saw (kept or rejected, by it or later)."""
    frame = view.kept([CAPTION_SOURCE])
    if frame is None:
        return None
    counts = dict(view.collect(frame.group_by(CAPTION_SOURCE).len()).iter_rows())
    web, synthetic = counts.get("web", 0), counts.get("synthetic", 0)
    totals = view.counts()
    rejected = totals.rows_rejected if totals else 0
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(totals.rejected.items())) if totals else ""
    figure = sources_figure(view, web, synthetic, rejected, score_histograms(view), threshold)
    lines = [
        view.plot("captions.png", figure, "captions chosen by CapFilt"),
        "",
        f"Of the {web + synthetic:,} rows kept to the end, **{synthetic:,}** "
        f"({synthetic / max(web + synthetic, 1):.1%}) carry a synthetic caption in place of their web "
        f"caption and {web:,} kept the web caption (threshold {threshold:g}, policy `{policy}`). "
        f"The selection rejected {rejected:,} rows" + (f" ({reasons})." if reasons else "."),
    ]
    selected = view.kept([SELECTED_CAPTIONS]) if policy == "all" else None
    if selected is not None:  # every passing caption goes on: say how many beyond the chosen one
        extra = pl.col(SELECTED_CAPTIONS).list.len() - 1
        more_rows, captions = view.collect(
            selected.select((extra > 0).sum().alias("rows"), extra.clip(lower_bound=0).sum().alias("captions"))
        ).row(0)
        lines[-1] += (
            f" With policy `all`, {more_rows:,} kept rows also pass {captions:,} more captions on in "
            f"`{SELECTED_CAPTIONS}`, beside the chosen one."
        )
    return "\n".join(lines + _examples(view))


def score_histograms(view: Any) -> tuple[Any, dict[str, Any]] | None:
    """Histograms of the web caption's score and the best synthetic caption's score over every row
    the filter scored, on shared edges."""
    seen = view.seen({CAPTION_SCORES: pl.List(pl.Float64)})
    if seen is None:
        return None
    scores = seen.select(
        pl.col(CAPTION_SCORES).list.first().alias("web"),
        pl.col(CAPTION_SCORES).list.slice(1).list.max().alias("synthetic"),
    ).filter(pl.col("web").is_not_null())
    return view.binned(scores, ["web", "synthetic"], bins=40)


def _examples(view: Any, count: int = 4) -> list[str]:
    examples = view.kept([IMAGE, WEB_CAPTION, CAPTION, CAPTION_SCORES, CAPTION_SOURCE])
    if examples is None:
        return []
    rows = view.collect(examples.filter(pl.col(CAPTION_SOURCE) == "synthetic").head(count)).to_dicts()
    lines = ["", "| image | web caption (score) | replaced by (score) |", "|---|---|---|"] if rows else []
    for i, row in enumerate(rows):
        image = view.image_link(f"example-{i}.jpg", row[IMAGE]) or "-"
        scores = row[CAPTION_SCORES]
        lines.append(
            f"| {image} | {view.cell(row[WEB_CAPTION])} ({scores[0]:.3f}) | "
            f"{view.cell(row[CAPTION])} ({max(scores[1:]):.3f}) |"
        )
    return lines


def sources_figure(
    view: Any, web: int, synthetic: int, rejected: int, scores: tuple[Any, dict[str, Any]] | None, threshold: float
) -> Any:
    """Left: kept rows by caption source and rows the selection rejected. Right (when scores
    exist): the web caption's score and the best synthetic caption's score, with the threshold."""
    from matplotlib.ticker import MaxNLocator

    colours = view.colours
    figure = view.figure(10 if scores else 6, 3.6)
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.4]) if scores else (figure.subplots(), None)
    labels = ["kept, web caption", "kept, synthetic caption", "rejected by CapFilt"]
    values = [web, synthetic, rejected]
    bars = left.barh(labels, values, color=[colours.before, colours.kept, colours.dropped])
    left.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8, padding=2)
    left.invert_yaxis()
    left.set_xlim(0, max(max(values), 1) * 1.25)
    left.tick_params(axis="y", labelsize=8)
    left.set_xlabel("rows")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_title("Captions chosen by CapFilt", fontsize=10)
    if right is not None:
        edges, counts = scores
        for column, label, colour in (
            ("web", "web caption", colours.before),
            ("synthetic", "best synthetic caption", colours.kept),
        ):
            right.stairs(
                counts[column],
                edges,
                color=colour,
                linewidth=1.6,
                label=f"{label} ({int(counts[column].sum()):,} rows)",
            )
        right.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        right.set_xlabel("caption score (filter's units)")
        right.set_ylabel("rows")
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_title("Scores of every row the filter scored", fontsize=10)
        right.legend(fontsize=8, loc="best")
    return figure
