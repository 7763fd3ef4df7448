"""The dataset card's topic sections on a run with every kind of stage: MetaCLIP, a CLIP-score
cutoff, dedup, CapFilt and instructions. Scripted stages stand in for the models (the selection,
dedup, balance and instruction stages are the real ones), so every number is known and the
card's statistics can be checked against the ledger and the parquet files."""

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

from pipelines.card.queries import caption_sources, cluster_sizes, entry_frequency, instruction_types, sample_rows
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


def _section(card: str, title: str) -> str:
    start = card.index(f"\n## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start : end if end > 0 else None]


def _open_png(path: Path):
    from PIL import Image

    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.format == "PNG"
        image.load()
        return np.asarray(image.convert("RGB"))


def test_every_section_is_there_in_order_with_a_drawn_plot(full_run):
    run, _ = full_run
    card = _card(run)
    titles = re.findall(r"^## (.+)$", card, flags=re.MULTILINE)
    assert titles == [
        "Funnel",
        "Sample pairs",
        "MetaCLIP entry frequency",
        "clip_score (clip_score_threshold)",
        "Duplicates",
        "Captions replaced by CapFilt",
        "Instruction types",
        "What each stage removed: examples",
        "Provenance",
    ]
    links = re.findall(r"!\[[^\]]*\]\((card/[^)]+\.png)\)", card)
    assert set(links) == {
        "card/funnel.png",
        "card/samples.png",
        "card/metaclip-entry-frequency.png",
        "card/clip_score_threshold-clip_score.png",
        "card/dedup-cluster-sizes.png",
        "card/capfilt-captions.png",
        "card/instruction-types.png",
    }
    for link in links:
        pixels = _open_png(run / link)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 10  # something was drawn, not a blank canvas
    assert "could not be written" not in card


def test_entry_frequency_is_the_balance_counts_before_and_the_kept_rows_after(full_run):
    run, manifest = full_run
    rundir = RunDir(str(run))
    frequency = entry_frequency(rundir, manifest, rundir.load_aggregate("metaclip_balance")[1])
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
    text = _section(_card(run), "MetaCLIP entry frequency")
    assert (
        f"{len(before):,} entries with {sum(before.values()):,} matches, the largest {max(before.values()):,}" in text
    )
    assert f"{len(after):,} entries with {sum(after.values()):,} matches" in text
    # Tail entries lose rows only to later stages; the head entry is sampled down.
    assert frequency.kept_share(head=True) < frequency.kept_share(head=False)


def test_cluster_sizes_match_the_duplicate_rejects_and_the_ledger(full_run):
    run, manifest = full_run
    (found,) = cluster_sizes(manifest)
    assert found.stage == "exact_duplicates"
    details = [json.loads(r["detail"]) for r in read_rejects(run).to_pylist() if r["stage"] == "exact_duplicates"]
    by_size = Counter(d["cluster_size"] for d in details)
    assert {size: n * (size - 1) for size, n in found.clusters.items()} == dict(by_size)
    assert found.duplicate_rows == len(details) == manifest.stage_totals()["exact_duplicates"].rows_rejected
    assert set(found.clusters) <= {2, 3}
    text = _section(_card(run), "Duplicates")
    assert f"**exact_duplicates**: {len(details)} of {found.rows}" in text  # the stage's notes sit here
    assert _card(run).count("**exact_duplicates**") == 1  # its notes are said once, in this section


def test_capfilt_counts_come_from_the_columns_and_the_ledger(full_run):
    run, manifest = full_run
    kept = read_phase(run, manifest.final_phase).to_pylist()
    sources = caption_sources(RunDir(str(run)), manifest, "capfilt_select")
    assert (sources.web, sources.synthetic) == (
        sum(r["caption_source"] == "web" for r in kept),
        sum(r["caption_source"] == "synthetic" for r in kept),
    )
    assert sources.synthetic > 0 and sources.web > 0
    rejected = manifest.stage_totals()["capfilt_select"].rejected
    assert sources.rejected == rejected["capfilt_no_caption"] > 0
    # Scores of every row the filter scored: kept, rejected by it, or rejected after it.
    scored = [r["caption_scores"] for r in kept + read_rejects(run).to_pylist() if r.get("caption_scores")]
    web, best = np.array([s[0] for s in scored]), np.array([max(s[1:]) for s in scored])
    assert sources.edges[0] == pytest.approx(0.2) and sources.edges[-1] == pytest.approx(0.8)
    assert sources.web_scores.tolist() == np.histogram(web, sources.edges)[0].tolist()
    assert sources.best_synthetic_scores.tolist() == np.histogram(best, sources.edges)[0].tolist()
    assert sources.examples
    for example in sources.examples:
        assert example["caption"].startswith("a synthetic photo") and "itm=0.2" in example["web_caption"]
    text = _section(_card(run), "Captions replaced by CapFilt")
    assert f"`capfilt_select` rejected {sources.rejected} rows (capfilt_no_caption {sources.rejected})." in text
    # The stage's own notes (counts, examples with thumbnails) sit under the plot, said once.
    assert f"**capfilt_select**: Of the {len(kept)} rows kept to the end, **{sources.synthetic}**" in text
    assert text.count("carry a synthetic caption") == 1 and "capfilt_select-example-0.jpg" in text
    assert "## What the stages found" not in _card(run)  # every stage's notes found their section


def test_instruction_types_count_the_records_and_the_rejects(full_run):
    run, manifest = full_run
    kept = read_phase(run, manifest.final_phase).to_pylist()
    types = instruction_types(RunDir(str(run)), manifest, ["instruct", "brief_descriptions"])
    expected = Counter(
        r["response_type"] for row in kept for column in ("instructions", "brief_records") for r in row[column]
    )
    assert types.records == dict(sorted(expected.items()))
    assert set(types.records) == {"brief", "conversation", "detailed", "reasoning"}
    assert types.rows == len(kept)
    assert types.rejected == {"no_caption": 1}  # row 9: its selected caption was only a chat marker
    text = _section(_card(run), "Instruction types")
    assert f"{sum(expected.values())} records in {len(kept)} kept rows" in text
    assert "Rows rejected by the instruction stages: no_caption 1." in text
    assert "| conversation |" in text  # InstructGenerate's own table follows the plot


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
