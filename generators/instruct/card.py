"""The instruction stages' part of the dataset card: records kept by response type (with turns and
tokens), and failures by reason (rows the stage rejected, response types that failed in rows kept
for their others)."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from schemas.columns import INSTRUCTION_FAILURES


def records_section(view: Any, column: str, lead: str) -> str | None:
    """The section of the stage that writes instruction records into ``column``; ``lead`` opens its text."""
    kept = view.kept([column])
    if kept is None:
        return None
    records = kept.select(pl.col(column).explode().struct.unnest()).drop_nulls("response_type")
    by_type = view.collect(
        records.group_by("response_type")
        .agg(
            pl.len().alias("records"),
            pl.col("conversations").list.len().mean().alias("turns"),
            pl.col("prompt_tokens").sum().alias("prompt"),
            pl.col("completion_tokens").sum().alias("completion"),
        )
        .sort("response_type")
    )
    rows = int(view.collect(kept.filter(pl.col(column).list.len() > 0).select(pl.len())).item())
    totals = view.counts()
    rejected = dict(totals.rejected) if totals else {}
    failed = _failed_in_kept_rows(view)
    kinds = dict(zip(by_type["response_type"].to_list(), by_type["records"].to_list()))
    figure = records_figure(view, kinds, rows, failure_reasons(rejected, failed))
    listed = ", ".join(f"{kind} {n:,}" for kind, n in kinds.items()) or "none"
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in sorted(rejected.items(), key=lambda i: -i[1]))
    lines = [
        view.plot("instruction-types.png", figure, "instruction types"),
        "",
        f"{lead} {sum(kinds.values()):,} records in {rows:,} kept rows: {listed}. "
        f"Rows rejected by the stage: {dropped or 'none'}.",
        "",
        "| response type | records | turns per record | prompt tokens | completion tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {kind} | {n:,} | {turns:.1f} | {prompt or 0:,} | {completion or 0:,} |"
        for kind, n, turns, prompt, completion in by_type.iter_rows()
    ]
    if failed:
        listed = ", ".join(f"{reason} {n:,}" for reason, n in sorted(failed.items(), key=lambda i: -i[1]))
        lines += ["", f"Response types that failed in rows kept for their others: {listed}."]
    return "\n".join(lines)


def _failed_in_kept_rows(view: Any) -> dict[str, int]:
    frame = view.kept([INSTRUCTION_FAILURES])
    if frame is None:
        return {}
    failures = view.collect(
        frame.select(pl.col(INSTRUCTION_FAILURES).explode().struct.unnest())
        .drop_nulls("reason")
        .group_by("reason")
        .len()
    )
    return dict(failures.iter_rows())


def failure_reasons(rejected: dict[str, int], failed: dict[str, int]) -> dict[str, tuple[int, int]]:
    """reason -> (rows rejected, response types failed in kept rows), most frequent first."""
    reasons = {reason: (rejected.get(reason, 0), failed.get(reason, 0)) for reason in {*rejected, *failed}}
    return dict(sorted(reasons.items(), key=lambda item: (-sum(item[1]), item[0])))


def records_figure(view: Any, kinds: dict[str, int], rows: int, failures: dict[str, tuple[int, int]]) -> Any:
    """Left: records kept per response type. Right (when anything failed): failures by reason."""
    from matplotlib.ticker import MaxNLocator

    colours = view.colours
    figure = view.figure(10 if failures else 5.5, 3.6)
    left, right = figure.subplots(1, 2) if failures else (figure.subplots(), None)
    bars = left.bar(list(kinds), list(kinds.values()), color=colours.kept)
    left.bar_label(bars, labels=[f"{n:,}" for n in kinds.values()], fontsize=8, padding=1)
    left.set_ylim(top=max(kinds.values(), default=1) * 1.15)
    left.set_ylabel("records")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.tick_params(axis="x", labelsize=8)
    left.set_title(f"Records kept by response type ({rows:,} rows)", fontsize=10)
    if right is not None:
        reasons = list(failures)
        y = np.arange(len(reasons))
        rejected = np.array([failures[r][0] for r in reasons])
        failed = np.array([failures[r][1] for r in reasons])
        for offset, values, colour, label in (
            (-0.2, rejected, colours.dropped, "rows rejected"),
            (0.2, failed, colours.warn, "failed types in kept rows"),
        ):
            right.barh(
                y + offset,
                values,
                height=0.4,
                color=colour,
                label=f"{label} ({int(values.sum()):,})" if values.any() else None,
            )
            for i, value in enumerate(values):
                if value:
                    right.text(value, i + offset, f" {value:,}", va="center", fontsize=7)
        right.set_yticks(y, reasons, fontsize=8)
        right.set_ylim(max(len(reasons), 3) - 0.5, -0.5)  # top to bottom; a lone reason is no slab
        right.set_xlim(0, max(int(rejected.max()), int(failed.max()), 1) * 1.25)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_xlabel("count")
        right.set_title("Failures by reason", fontsize=10)
        right.legend(fontsize=8, loc="lower right")
    return figure
