"""The dataset card on a run with every kind of stage: MetaCLIP, a CLIP-score cutoff, dedup,
CapFilt and instructions, each stage writing its own section. Scripted stages stand in for the
models (the selection, dedup, balance and instruction stages are the real ones), so every number
is known and the card's statistics can be checked against the ledger and the parquet files."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.metaclip.card import EntryFrequency, kept_entry_counts
from generators.capfilt_card import score_histograms
from pipelines.card.queries import sample_rows
from pipelines.card.view import CardView
from pipelines.engine.rundir import RunDir
from pipelines.stage import Stage
from schemas.columns import CAPTION, CAPTION_SCORES, SOURCE_INDEX, SYNTHETIC_CAPTIONS
from tests.conftest import read_phase, read_rejects, run_pipeline_dict

ROWS = 48
#: Rows that repeat an earlier caption exactly: a cluster of 3 (0, 4, 8) and one of 2 (12, 16).
REPEATS = {4: 0, 8: 0, 16: 12}
COLOURS = ["red", "green", "blue", "black", "white", "brown"]


@dataclass
class ScriptedCaptioner(Stage):
    """Two synthetic captions per row; row 9's first one is only a chat marker (cleaned to nothing)."""

    name: ClassVar[str] = "scripted_captioner"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)
    output_columns: ClassVar[tuple[str, ...]] = (SYNTHETIC_CAPTIONS,)

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = [
            ["<|im_start|>" if i == 9 else f"a synthetic photo of a dog number {i}", f"a blurry photo {i}"]
            for i in batch[SOURCE_INDEX].to_pylist()
        ]
        return pa.table({SYNTHETIC_CAPTIONS: pa.array(captions, pa.list_(pa.string()))})


@dataclass
class ScriptedCaptionScores(Stage):
    """The web caption scores its ``itm=<x>`` token; the first synthetic caption 0.8 on every third
    row (0.3 otherwise), the second 0.1."""

    name: ClassVar[str] = "scripted_caption_scores"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, CAPTION, SYNTHETIC_CAPTIONS)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION_SCORES,)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = [
            [float(re.search(r"itm=([0-9.]+)", caption).group(1)), 0.8 if i % 3 == 0 else 0.3, 0.1]
            for i, caption in zip(batch[SOURCE_INDEX].to_pylist(), batch[CAPTION].to_pylist())
        ]
        return pa.table({CAPTION_SCORES: pa.array(scores, pa.list_(pa.float32()))})


def _caption(i: int) -> str:
    animal = "cat" if i % 4 == 0 else "dog"
    score = 0.1 if i % 10 == 3 else 0.6
    itm = 0.7 if i % 2 == 0 else 0.2
    return f"a {COLOURS[i % len(COLOURS)]} {animal} on a sofa number {i} score={score} itm={itm}"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A finished run of 48 rows through every stage kind the card describes."""
    from pipelines.engine.runner import LocalRunner

    root = tmp_path_factory.mktemp("card-full")
    captions = [_caption(i) for i in range(ROWS)]
    for row, first in REPEATS.items():
        captions[row] = captions[first]
    pool = root / "pool.parquet"
    pq.write_table(pa.table({"url": [f"http://img.test/{i}.png" for i in range(ROWS)], "caption": captions}), pool)
    metadata = root / "metadata.json"
    metadata.write_text(json.dumps(["dog", "cat", "sofa", "red"]))
    here = "tests.pipelines.card.test_sections"
    raw = {
        "name": "full",
        "input": str(pool),
        "output_dir": str(root / "runs"),
        "shard_size": 16,
        "stages": [
            {"stage": "tests.stages:PaintImages"},
            {"stage": "curation.metaclip:MetaclipMatch", "metadata": str(metadata)},
            {"stage": "curation.metaclip:MetaclipBalance", "threshold": 15},
            {"stage": "tests.stages:EmbedByGroup"},
            {"stage": "curation.clip_score:ClipScoreThreshold", "min_score": 0.2},
            {"stage": "curation.dedup:ExactDuplicates", "keys": ["caption"]},
            {"stage": f"{here}:ScriptedCaptioner"},
            {"stage": f"{here}:ScriptedCaptionScores"},
            {"stage": "generators.capfilt_filter:CapFiltSelect", "threshold": 0.5},
            {"stage": "generators.instruct:InstructGenerate", "caption_columns": ["selected_captions"]},
            {"stage": "generators.instruct:BriefDescriptions"},
        ],
    }
    plan, manifest = run_pipeline_dict(raw, LocalRunner())
    return Path(plan.run_uri), manifest


def _card(run: Path) -> str:
    return (run / "README.md").read_text()


def _section(card: str, title: str, level: str = "##") -> str:
    start = card.index(f"\n{level} {title}\n")
    end = min((i for i in (card.find("\n## ", start + 1), card.find("\n### ", start + 1)) if i > 0), default=-1)
    return card[start : end if end > 0 else None]


def _view(run: Path, manifest, stage: str) -> CardView:
    return CardView(RunDir(str(run)), manifest, stage, manifest.aggregates.get(stage))


def _open_png(path: Path):
    from PIL import Image

    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.format == "PNG"
        image.load()
        return np.asarray(image.convert("RGB"))


def test_every_section_is_there_in_order_with_a_drawn_plot(full_run):
    run, _ = full_run
    card = _card(run)
    assert re.findall(r"^## (.+)$", card, flags=re.MULTILINE) == [
        "Funnel",
        "Sample pairs",
        "clip_score (clip_score_threshold)",
        "What the stages found",
        "What each stage removed: examples",
        "Provenance",
    ]
    assert re.findall(r"^### (.+)$", card, flags=re.MULTILINE) == [
        "metaclip_match",
        "metaclip_balance",
        "exact_duplicates",
        "capfilt_select",
        "instruct",
        "brief_descriptions",
    ]
    links = re.findall(r"!\[[^\]]*\]\((card/[^)]+\.png)\)", card)
    assert set(links) == {
        "card/funnel.png",
        "card/samples.png",
        "card/metaclip_balance-entry-frequency.png",
        "card/clip_score_threshold-clip_score.png",
        "card/exact_duplicates-cluster-sizes.png",
        "card/capfilt_select-captions.png",
        "card/instruct-instruction-types.png",
        "card/brief_descriptions-instruction-types.png",
    }
    for link in links:
        pixels = _open_png(run / link)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 10  # something was drawn, not a blank canvas
    assert "could not be written" not in card


def test_entry_frequency_is_the_balance_counts_before_and_the_kept_rows_after(full_run):
    run, manifest = full_run
    view = _view(run, manifest, "metaclip_balance")
    state = view.aggregate()
    frequency = EntryFrequency(kept_entry_counts(view), state["counts"], state["threshold"])
    # Before: every row the balance stage saw, i.e. kept rows plus rows rejected by it or later.
    kept = read_phase(run, manifest.final_phase)
    rejects = read_rejects(run).to_pylist()
    later = {
        "metaclip_balance",
        "embed_by_group",
        "clip_score_threshold",
        "exact_duplicates",
        "capfilt_select",
        "instruct",
        "brief_descriptions",
    }
    seen = kept["metaclip_entries"].to_pylist() + [r["metaclip_entries"] for r in rejects if r["stage"] in later]
    before = Counter(e for entries in seen for e in entries)
    after = Counter(e for entries in kept["metaclip_entries"].to_pylist() for e in entries)
    assert {e: int(n) for e, n in enumerate(frequency.before) if n} == before
    assert {e: int(n) for e, n in enumerate(frequency.after) if n} == after
    assert frequency.threshold == 15 == manifest.aggregates["metaclip_balance"]["threshold"]
    assert before[0] > 15 >= before[1]  # dog is a head entry, cat a tail one
    text = _section(_card(run), "metaclip_balance", "###")
    assert (
        f"{len(before):,} entries with {sum(before.values()):,} matches, the largest {max(before.values()):,}" in text
    )
    assert f"{len(after):,} entries with {sum(after.values()):,} matches" in text
    # Tail entries lose rows only to later stages; the head entry is sampled down.
    assert frequency.kept_share(head=True) < frequency.kept_share(head=False)
    # The match stage names the entries the kept rows match most, by their metadata text.
    top = _section(_card(run), "metaclip_match", "###")
    names = ["dog", "cat", "sofa", "red"]  # the metadata file, in order
    ranked = ", ".join(f"{names[e]} {n:,}" for e, n in sorted(after.items(), key=lambda item: (-item[1], item[0])))
    assert f"the most matched: {ranked}." in top


def test_cluster_sizes_match_the_duplicate_rejects_and_the_ledger(full_run):
    run, manifest = full_run
    summary = manifest.aggregates["exact_duplicates"]
    clusters = {int(size): n for size, n in summary["size_histogram"].items()}
    details = [json.loads(r["detail"]) for r in read_rejects(run).to_pylist() if r["stage"] == "exact_duplicates"]
    by_size = Counter(d["cluster_size"] for d in details)
    assert {size: n * (size - 1) for size, n in clusters.items()} == dict(by_size)
    assert summary["duplicate_rows"] == len(details) == manifest.stage_totals()["exact_duplicates"].rows_rejected
    assert set(clusters) <= {2, 3}
    text = _section(_card(run), "exact_duplicates", "###")
    assert f"{len(details)} of {summary['rows']} rows were duplicates" in text
    assert "![duplicate clusters by size](card/exact_duplicates-cluster-sizes.png)" in text


def test_capfilt_counts_come_from_the_columns_and_the_ledger(full_run):
    run, manifest = full_run
    kept = read_phase(run, manifest.final_phase).to_pylist()
    web = sum(r["caption_source"] == "web" for r in kept)
    synthetic = sum(r["caption_source"] == "synthetic" for r in kept)
    assert synthetic > 0 and web > 0
    rejected = manifest.stage_totals()["capfilt_select"].rejected
    assert rejected["capfilt_no_caption"] > 0
    # Scores of every row the filter scored: kept, rejected by it, or rejected after it.
    scored = [r["caption_scores"] for r in kept + read_rejects(run).to_pylist() if r.get("caption_scores")]
    web_scores, best = np.array([s[0] for s in scored]), np.array([max(s[1:]) for s in scored])
    edges, counts = score_histograms(_view(run, manifest, "capfilt_select"))
    assert edges[0] == pytest.approx(0.2) and edges[-1] == pytest.approx(0.8)
    assert counts["web"].tolist() == np.histogram(web_scores, edges)[0].tolist()
    assert counts["synthetic"].tolist() == np.histogram(best, edges)[0].tolist()
    text = _section(_card(run), "capfilt_select", "###")
    assert f"Of the {len(kept)} rows kept to the end, **{synthetic}**" in text
    n = rejected["capfilt_no_caption"]
    assert f"The selection rejected {n} rows (capfilt_no_caption {n})." in text
    examples = [line for line in text.splitlines() if "capfilt_select-example-" in line]
    assert examples and all("a synthetic photo" in line and "itm=0.2" in line for line in examples)


def test_instruction_types_count_the_records_and_the_rejects(full_run):
    run, manifest = full_run
    kept = read_phase(run, manifest.final_phase).to_pylist()
    totals = manifest.stage_totals()
    for stage, column, kinds in (
        ("instruct", "instructions", {"conversation", "detailed", "reasoning"}),
        ("brief_descriptions", "brief_records", {"brief"}),
    ):
        expected = Counter(r["response_type"] for row in kept for r in row[column])
        assert set(expected) == kinds
        text = _section(_card(run), stage, "###")
        listed = ", ".join(f"{kind} {n:,}" for kind, n in sorted(expected.items()))
        assert f"{sum(expected.values())} records in {len(kept)} kept rows: {listed}." in text
        for kind, n in expected.items():
            assert f"| {kind} | {n:,} |" in text
        dropped = ", ".join(f"{reason} {n:,}" for reason, n in totals[stage].rejected.items())
        assert f"Rows rejected by the stage: {dropped or 'none'}." in text
    assert totals["instruct"].rejected == {"no_caption": 1}  # row 9: its selected caption was only a chat marker


def test_sample_pairs_are_kept_rows_with_their_final_captions(full_run):
    run, manifest = full_run
    kept = {r["uid"]: r for r in read_phase(run, manifest.final_phase).to_pylist()}
    samples = sample_rows(RunDir(str(run)), manifest, 8)
    assert len(samples) == 8 and len({s["uid"] for s in samples}) == 8
    for sample in samples:
        assert sample["caption"] == kept[sample["uid"]]["caption"]
        assert sample["image"] == kept[sample["uid"]]["image"]
    text = _section(_card(run), "Sample pairs")
    assert all(f"| `{s['uid']}` |" in text for s in samples)


def test_funnel_plot_and_table_are_the_ledger(full_run):
    run, manifest = full_run
    text = _section(_card(run), "Funnel")
    for name, counts in manifest.stage_totals().items():
        assert f"| {name} | {counts.rows_in:,} | {counts.rows_kept:,} |" in text
    assert text.index("![funnel](card/funnel.png)") < text.index("| phase |")
