"""The dataset card: ``README.md`` in a run directory, written when a run completes.

It shows where every row went (the ledger as a funnel: rows in, kept, rejected by reason, per
stage, as a table and a plot), sample pairs, a histogram with the cutoff marked for every
threshold a stage applied (the CLIP score, say), what each stage found (the section each stage
writes itself through ``card_notes``: MetaCLIP's entry frequency, duplicate clusters, CapFilt's
captions, instruction types, ...), examples of what each stage removed, what produced the run
(package versions, config hash) and where the export is. Statistics are polars scans
(:mod:`pipelines.card.stats`, :mod:`pipelines.card.queries`); plots are PNGs written beside the
card under ``card/``. ``vlmcurate card RUN`` writes it again for an existing run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipelines.card.contact_sheet import contact_sheet_png
from pipelines.card.figures import funnel_png, histogram_png, markdown_cell
from pipelines.card.queries import reject_examples, sample_rows
from pipelines.card.stats import KEPT, REJECTED_HERE, score_histogram, write_asset
from pipelines.card.view import CardView
from pipelines.engine.chain import PlannedStage
from pipelines.engine.rundir import RunDir
from pipelines.stage import Cutoff
from schemas.columns import CAPTION, CAPTION_SOURCE, IMAGE, UID
from schemas.manifest import Manifest
from schemas.rejects import DETAIL, REASON

CARD = "README.md"

log = logging.getLogger(__name__)


def write_card(rundir: RunDir, manifest: Manifest, stages: list[PlannedStage]) -> str:
    """Write the card of the run in ``rundir`` (and its plots); return the card's path."""
    sections = [
        _header(manifest),
        _guarded("funnel", _funnel, rundir, manifest),
        _guarded("samples", _samples, rundir, manifest),
    ]
    for planned in stages:
        cutoffs = planned.stage.cutoffs(manifest.aggregates.get(planned.name))
        for column in dict.fromkeys(c.column for c in cutoffs):
            chosen = [c for c in cutoffs if c.column == column]
            sections.append(_guarded("cutoff", _cutoff_section, rundir, manifest, planned.name, column, chosen))
    sections += [
        _stage_sections(rundir, manifest, stages),
        _guarded("removed examples", _removed_examples, rundir, manifest),
        _provenance(manifest),
    ]
    path = rundir.path(CARD)
    rundir.write_bytes(path, ("\n\n".join(s for s in sections if s) + "\n").encode())
    return path


def _guarded(name: str, section: Callable[..., str | None], *args) -> str | None:
    """``section(*args)``, or a line saying it failed: one unreadable column must not cost the whole card."""
    try:
        return section(*args)
    except Exception as e:
        log.exception("dataset card of a run: the %s section failed", name)
        return f"*The card's {name} section could not be written: {e!r}.*"


def _stage_sections(rundir: RunDir, manifest: Manifest, stages: list[PlannedStage]) -> str | None:
    """Each stage's own section (``card_notes``), in pipeline order."""
    parts = []
    for planned in stages:
        view = CardView(rundir, manifest, planned.name, manifest.aggregates.get(planned.name))
        notes = _guarded(f"`{planned.name}`", planned.stage.card_notes, view)
        if notes:
            parts.append(f"### {planned.name}\n\n{notes}")
    return "## What the stages found\n\n" + "\n\n".join(parts) if parts else None


def _samples(rundir: RunDir, manifest: Manifest, count: int = 8) -> str | None:
    """A contact sheet of kept images with their final captions (a table of captions for a run
    without images)."""
    rows = sample_rows(rundir, manifest, count)
    if not rows:
        return None
    lines = [
        "## Sample pairs",
        "",
        f"{len(rows)} rows kept to the end, from the first rows of shards spread over the final phase.",
    ]
    if IMAGE in rows[0]:
        sheet = [
            (row[IMAGE], ("[CapFilt] " if row.get(CAPTION_SOURCE) == "synthetic" else "") + (row[CAPTION] or ""))
            for row in rows
        ]
        lines += ["", f"![sample pairs]({write_asset(rundir, 'samples.png', contact_sheet_png(sheet))})"]
    source = CAPTION_SOURCE in rows[0]
    lines += ["", "| uid | caption |" + (" caption from |" if source else ""), "|---|---|" + ("---|" if source else "")]
    lines += [
        f"| `{row[UID]}` | {markdown_cell(row[CAPTION])} |" + (f" {row[CAPTION_SOURCE]} |" if source else "")
        for row in rows
    ]
    return "\n".join(lines)


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


def _funnel(rundir: RunDir, manifest: Manifest) -> str:
    lines = ["## Funnel", ""]
    steps = [(name, counts.rows_in, counts.rows_kept) for name, counts in manifest.stage_totals().items()]
    if steps:
        lines += [f"![funnel]({write_asset(rundir, 'funnel.png', funnel_png(steps))})", ""]
    lines += ["| phase | stage | rows in | kept | rejected | reasons |", "|---|---|---:|---:|---:|---|"]
    for phase in manifest.phases:
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


def _removed_examples(rundir: RunDir, manifest: Manifest) -> str | None:
    examples = reject_examples(rundir, manifest)
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
