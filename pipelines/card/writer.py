"""The dataset card: ``README.md`` in a run directory, written when a run completes.

It shows where every row went (the ledger as a funnel: rows in, kept, rejected by reason, per
stage, as a table and a plot), sample pairs, the topic sections of :mod:`pipelines.card.sections`
(MetaCLIP entry frequency, duplicate clusters, CapFilt captions, instruction types) when the run
has what they need, a histogram with the cutoff marked for every threshold a stage applied (the
CLIP score, say), what produced the run (package versions, config hash) and where the export is.
Statistics are polars scans (:mod:`pipelines.card.stats`, :mod:`pipelines.card.queries`); plots
are PNGs written beside the card under ``card/``. ``vlmcurate card RUN`` writes it again for an
existing run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipelines.card.figures import histogram_png
from pipelines.card.queries import reject_examples
from pipelines.card.sections import (
    CardContext,
    capfilt_section,
    dedup_section,
    instructions_section,
    metaclip_section,
    samples_section,
)
from pipelines.card.stats import KEPT, REJECTED_HERE, score_histogram, write_asset
from pipelines.card.topic_charts import funnel_png
from pipelines.card.view import CardView
from pipelines.engine.chain import PlannedStage
from pipelines.engine.rundir import RunDir
from pipelines.stage import Cutoff
from schemas.columns import CAPTION
from schemas.manifest import Manifest
from schemas.rejects import DETAIL, REASON

CARD = "README.md"

log = logging.getLogger(__name__)


def write_card(rundir: RunDir, manifest: Manifest, stages: list[PlannedStage]) -> str:
    """Write the card of the run in ``rundir`` (and its plots); return the card's path."""
    notes = {
        p.name: p.stage.card_notes(CardView(rundir, manifest, p.name, manifest.aggregates.get(p.name))) for p in stages
    }
    ctx = CardContext(rundir, manifest, stages, {name: text for name, text in notes.items() if text})
    sections = [
        _header(manifest),
        _guarded(_funnel, ctx),
        _guarded(samples_section, ctx),
        _guarded(metaclip_section, ctx),
    ]
    for planned in stages:
        cutoffs = planned.stage.cutoffs(manifest.aggregates.get(planned.name))
        for column in dict.fromkeys(c.column for c in cutoffs):
            sections.append(
                _cutoff_section(rundir, manifest, planned.name, column, [c for c in cutoffs if c.column == column])
            )
    sections += [
        _guarded(section, ctx) for section in (dedup_section, capfilt_section, instructions_section, _removed_examples)
    ]
    if ctx.notes:
        found = "\n\n".join(f"**{p.name}**: {ctx.notes[p.name]}" for p in stages if p.name in ctx.notes)
        sections.append(f"## What the stages found\n\n{found}")
    sections.append(_provenance(manifest))
    path = rundir.path(CARD)
    rundir.write_bytes(path, ("\n\n".join(s for s in sections if s) + "\n").encode())
    return path


def _guarded(section: Callable[[CardContext], str | None], ctx: CardContext) -> str | None:
    """A section, or a line saying it failed: one unreadable column must not cost the whole card."""
    try:
        return section(ctx)
    except Exception as e:
        log.exception("dataset card of %s: %s failed", ctx.manifest.name, section.__name__)
        name = section.__name__.strip("_").removesuffix("_section")
        return f"*The card's {name} section could not be written: {e!r}.*"


def _header(manifest: Manifest) -> str:
    totals = manifest.stage_totals()
    first = next(iter(totals.values()), None)
    rows_in = first.rows_in if first else 0
    rows_kept = manifest.phases[-1].rows_out if manifest.phases else 0
    lines = [
        f"# Dataset card: {manifest.name}",
        "",
        f"Status **{manifest.status}**; config hash `{manifest.config_hash}`; "
        f"created {manifest.created_at}, last updated {manifest.updated_at}.",
        "",
        f"**{rows_in:,}** rows in, **{rows_kept:,}** kept ({_percent(rows_kept, rows_in)}), "
        f"**{rows_in - rows_kept:,}** rejected, each with a reason under `rejects/`.",
    ]
    if manifest.export:
        export = manifest.export
        lines += [
            "",
            f"Export: `{export.get('folder')}` ({', '.join(export.get('formats', []))}; "
            f"{export.get('shards')} shard(s) of up to {export.get('samples_per_shard')} samples).",
        ]
    return "\n".join(lines)


def _funnel(ctx: CardContext) -> str:
    lines = ["## Funnel", ""]
    steps = [(name, counts.rows_in, counts.rows_kept) for name, counts in ctx.manifest.stage_totals().items()]
    if steps:
        lines += [f"![funnel]({write_asset(ctx.rundir, 'funnel.png', funnel_png(steps))})", ""]
    lines += ["| phase | stage | rows in | kept | rejected | reasons |", "|---|---|---:|---:|---:|---|"]
    for phase in ctx.manifest.phases:
        for name in phase.stages:
            counts = phase.counts.get(name)
            if counts is None:
                continue
            rejected = counts.rows_in - counts.rows_kept
            reasons = ", ".join(
                f"{reason} {n:,}" for reason, n in sorted(counts.rejected.items(), key=lambda item: (-item[1], item[0]))
            )
            lines.append(
                f"| {phase.name} | {name} | {counts.rows_in:,} | {counts.rows_kept:,} | "
                f"{rejected:,} | {reasons or '-'} |"
            )
    return "\n".join(lines)


def _removed_examples(ctx: CardContext) -> str | None:
    examples = reject_examples(ctx.rundir, ctx.manifest)
    if not examples:
        return None
    lines = [
        "## What each stage removed: examples",
        "",
        "A few rejected rows per stage (from the first reject files of each phase; every rejected row, "
        "with its reason, is under `rejects/`). A stage removing rows that look right is costing you data.",
        "",
        "| stage | reason | caption | detail |",
        "|---|---|---|---|",
    ]
    for stage, rows in examples.items():
        for row in rows:
            lines.append(f"| {stage} | {row[REASON]} | {_cell(row[CAPTION], 90)} | {_cell(row[DETAIL], 70)} |")
    return "\n".join(lines)


def _cell(text: str | None, width: int) -> str:
    """``text`` for one markdown table cell: one line, no pipes, at most ``width`` characters."""
    if text is None:
        return "-"
    flat = " ".join(text.replace("|", "/").split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _cutoff_section(rundir: RunDir, manifest: Manifest, stage: str, column: str, cutoffs: list[Cutoff]) -> str:
    title = f"{column} ({stage})"
    histogram = score_histogram(rundir, manifest, column, stage)
    if histogram is None:
        return f"## {title}\n\nNo row has a `{column}` value."
    asset = write_asset(rundir, f"{stage}-{column}.png", histogram_png(histogram, cutoffs, title))
    marks = "; ".join(
        c.label if c.label.endswith((f" {c.value:g}", f" {c.value:.4g}")) else f"{c.label}: {c.value:.4g}"
        for c in cutoffs
    )
    q = histogram.quantiles
    rejected_here = int(histogram.counts[REJECTED_HERE].sum())
    return "\n".join(
        [
            f"## {title}",
            "",
            f"![{title}]({asset})",
            "",
            f"{histogram.total:,} rows have a `{column}`: 10th percentile {q[0.1]:.4f}, median {q[0.5]:.4f}, "
            f"90th percentile {q[0.9]:.4f}. {marks}; {rejected_here:,} rows rejected by `{stage}`, "
            f"{int(histogram.counts[KEPT].sum()):,} kept to the end.",
        ]
    )


def _provenance(manifest: Manifest) -> str:
    lines = [
        "## Provenance",
        "",
        "The full configuration is in `manifest.json` (`config`).",
        "",
        "| package | version |",
        "|---|---|",
    ]
    lines += [f"| {name} | {version} |" for name, version in manifest.versions.items()]
    for entry in manifest.history:
        lines.append("")
        lines.append(
            f"Resumed at {entry.get('resumed_at')}"
            + (f" with changed versions {entry['versions_changed']}" if entry.get("versions_changed") else "")
            + "."
        )
    return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"
