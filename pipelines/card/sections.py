"""Topic sections of the dataset card: sample pairs, MetaCLIP balancing, duplicate clusters,
CapFilt captions and instruction types.

Each section is written only when the run has what it needs (a stage that writes the columns,
the columns in the kept rows, a global aggregate) and returns None otherwise. Stages are
recognised by the columns they declare, never by their class, so ``pipelines`` imports nothing
from ``curation`` or ``generators``. A section also takes the ``card_notes`` of its stages, so
their notes sit beside the plot they explain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.card.contact_sheet import contact_sheet_png
from pipelines.card.figures import markdown_cell
from pipelines.card.queries import (
    EntryFrequency,
    caption_sources,
    cluster_sizes,
    entry_frequency,
    instruction_types,
    sample_rows,
)
from pipelines.card.stats import write_asset
from pipelines.card.topic_charts import (
    caption_sources_png,
    cluster_sizes_png,
    entry_frequency_png,
    instruction_types_png,
)
from pipelines.engine.chain import PlannedStage
from pipelines.engine.rundir import RunDir
from schemas.columns import (
    BRIEF_RECORDS,
    CAPTION,
    CAPTION_SCORES,
    CAPTION_SOURCE,
    IMAGE,
    INSTRUCTIONS,
    METACLIP_ENTRIES,
    SYNTHETIC_CAPTIONS,
    UID,
    WEB_CAPTION,
)
from schemas.manifest import Manifest


@dataclass
class CardContext:
    """The run a card describes, and the stages' notes that no section has placed yet."""

    rundir: RunDir
    manifest: Manifest
    stages: list[PlannedStage]
    notes: dict[str, str]  # stage name -> its card_notes

    def writing(self, columns: set[str]) -> list[PlannedStage]:
        """The stages that write any of ``columns``, in pipeline order."""
        return [p for p in self.stages if columns & set(p.stage.output_columns)]

    def take_notes(self, names: list[str]) -> list[str]:
        """The notes of the named stages as markdown paragraphs; they are not listed again later."""
        return [f"**{name}**: {self.notes.pop(name)}" for name in names if self.notes.get(name)]


def samples_section(ctx: CardContext, count: int = 8) -> str | None:
    """A contact sheet of kept images with their final captions (a table of captions for a run
    without images)."""
    rows = sample_rows(ctx.rundir, ctx.manifest, count)
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
        asset = write_asset(ctx.rundir, "samples.png", contact_sheet_png(sheet))
        lines += ["", f"![sample pairs]({asset})"]
    source = CAPTION_SOURCE in rows[0]
    lines += ["", "| uid | caption |" + (" caption from |" if source else ""), "|---|---|" + ("---|" if source else "")]
    lines += [
        f"| `{row[UID]}` | {markdown_cell(row[CAPTION])} |" + (f" {row[CAPTION_SOURCE]} |" if source else "")
        for row in rows
    ]
    return "\n".join(lines)


def metaclip_section(ctx: CardContext) -> str | None:
    """Entry frequency before and after MetaCLIP balancing, on log-log axes."""
    balance = next((p for p in ctx.stages if p.is_global and METACLIP_ENTRIES in p.stage.input_columns), None)
    state = ctx.rundir.load_aggregate(balance.name)[1] if balance else None
    frequency = entry_frequency(ctx.rundir, ctx.manifest, state)
    if frequency is None or not (frequency.after.any() or (frequency.before is not None and frequency.before.any())):
        return None
    asset = write_asset(ctx.rundir, "metaclip-entry-frequency.png", entry_frequency_png(frequency))
    lines = ["## MetaCLIP entry frequency", "", f"![MetaCLIP entry frequency]({asset})", "", _balance_text(frequency)]
    names = [p.name for p in ctx.stages if METACLIP_ENTRIES in (*p.stage.input_columns, *p.stage.output_columns)]
    notes = ctx.take_notes(names)
    return "\n".join(lines + (["", *notes] if notes else []))


def _balance_text(frequency: EntryFrequency) -> str:
    after = EntryFrequency.ranked(frequency.after)
    kept = (
        f"Kept to the end: {len(after):,} entries with {int(after.sum()):,} matches"
        f"{f', the largest {int(after[0]):,}' if len(after) else ''}."
    )
    if frequency.before is None:
        return "Matches per entry (a caption counts once for each entry it matches) among the rows kept. " + kept
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
            f"{int((after > t).sum()):,} after."
        )
        if head is not None:
            text += f" Head entries kept {head:.1%} of their matches"
            text += f", tail entries {tail:.1%}." if tail is not None else "."
        text += " Balancing keeps about t of a head entry and all of a tail entry; later stages drop rows of both."
    return text


def dedup_section(ctx: CardContext) -> str | None:
    """Duplicate clusters by size, for every dedup stage that recorded its clusters."""
    found = cluster_sizes(ctx.manifest)
    if not found:
        return None
    lines = ["## Duplicates", ""]
    if any(stage.clusters for stage in found):
        asset = write_asset(ctx.rundir, "dedup-cluster-sizes.png", cluster_sizes_png(found))
        lines += [f"![duplicate clusters by size]({asset})", ""]
    lines += [
        "A cluster of n rows keeps one (its survivor) and rejects n − 1; rejects name the survivor "
        "(`duplicate_of`) and the cluster's size in their detail."
    ]
    for stage in found:
        notes = ctx.take_notes([stage.stage])
        lines += [
            "",
            *(
                notes
                or [
                    f"**{stage.stage}**: {stage.duplicate_rows:,} of {stage.rows:,} rows were "
                    f"duplicates in {sum(stage.clusters.values()):,} clusters."
                ]
            ),
        ]
    return "\n".join(lines)


def capfilt_section(ctx: CardContext) -> str | None:
    """Kept rows by caption source (web or synthetic), CapFilt's rejects, and the caption scores."""
    selectors = ctx.writing({CAPTION_SOURCE})
    if not selectors:
        return None
    select = selectors[-1]
    sources = caption_sources(ctx.rundir, ctx.manifest, select.name)
    if sources is None:
        return None
    threshold = getattr(select.stage, "threshold", None)
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    asset = write_asset(ctx.rundir, "capfilt-captions.png", caption_sources_png(sources, threshold))
    kept = sources.web + sources.synthetic
    totals = ctx.manifest.stage_totals().get(select.name)
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(totals.rejected.items())) if totals else ""
    rejected = f"`{select.name}` rejected {sources.rejected:,} rows" + (f" ({reasons})." if reasons else ".")
    lines = ["## Captions replaced by CapFilt", "", f"![captions chosen by CapFilt]({asset})", ""]
    notes = ctx.take_notes([p.name for p in ctx.writing({SYNTHETIC_CAPTIONS, CAPTION_SCORES, CAPTION_SOURCE})])
    if notes:  # the stages' notes give the counts and examples (with thumbnails)
        return "\n".join(lines + [rejected, "", *notes])
    lines.append(
        f"{sources.synthetic:,} of {kept:,} kept rows ({sources.synthetic / max(kept, 1):.1%}) carry a "
        f"synthetic caption, {sources.web:,} their web caption. " + rejected
    )
    if sources.examples:
        scored = CAPTION_SCORES in sources.examples[0]
        lines += [
            "",
            "| web caption (score) | replaced by (best synthetic score) |"
            if scored
            else "| web caption | replaced by |",
            "|---|---|",
        ]
        lines += [
            f"| {markdown_cell(e[WEB_CAPTION])}{_score(e, web=True)} | "
            f"{markdown_cell(e[CAPTION])}{_score(e, web=False)} |"
            for e in sources.examples
        ]
    return "\n".join(lines)


def _score(example: dict[str, Any], web: bool) -> str:
    scores = example.get(CAPTION_SCORES) or []
    value = (scores[0] if scores else None) if web else max(scores[1:], default=None)
    return f" ({value:.3f})" if value is not None else ""


def instructions_section(ctx: CardContext) -> str | None:
    """Instruction records kept by response type, and failures by reason."""
    stages = ctx.writing({INSTRUCTIONS, BRIEF_RECORDS})
    if not stages:
        return None
    types = instruction_types(ctx.rundir, ctx.manifest, [p.name for p in stages])
    if types is None:
        return None
    asset = write_asset(ctx.rundir, "instruction-types.png", instruction_types_png(types))
    records = ", ".join(f"{kind} {n:,}" for kind, n in types.records.items()) or "none"
    rejected = ", ".join(f"{reason} {n:,}" for reason, n in sorted(types.rejected.items(), key=lambda i: -i[1]))
    lines = [
        "## Instruction types",
        "",
        f"![instruction types]({asset})",
        "",
        f"{sum(types.records.values()):,} records in {types.rows:,} kept rows: {records}. "
        f"Rows rejected by the instruction stages: {rejected or 'none'}.",
    ]
    notes = ctx.take_notes([p.name for p in stages])
    return "\n".join(lines + (["", *notes] if notes else []))
