"""The dataset card on runs that lack stages or rows, and with stages of the user's own: sections
appear only with their data, and nothing in them can sink the card."""

from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from generators.instruct.card import records_section
from pipelines.card.contact_sheet import contact_sheet_png, wrap
from pipelines.demo.pool import write_demo_pool
from pipelines.engine.rundir import RunDir
from pipelines.stage import Rejections, Stage
from schemas.columns import (
    CAPTION,
    CAPTION_SOURCE,
    INSTRUCTION_FAILURES,
    INSTRUCTIONS,
    SOURCE_INDEX,
    UID,
    WEB_CAPTION,
)
from schemas.llava import FAILURE_TYPE, RECORD_TYPE
from tests.conftest import TEXT_ONLY_HOST, read_phase, run_pipeline_dict

HERE = "tests.pipelines.card.test_sparse_runs"


@dataclass
class ScriptedInstructions(Stage):
    """Conversation and detailed records for every row; reasoning fails (``llm_unparseable``) on
    odd rows; rows whose index is a multiple of 5 get nothing and are rejected ``llm_off_task``."""

    name: ClassVar[str] = "scripted_instructions"
    input_columns: ClassVar[tuple[str, ...]] = (UID, SOURCE_INDEX)
    output_columns: ClassVar[tuple[str, ...]] = (INSTRUCTIONS, INSTRUCTION_FAILURES)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        records, failures, off_task = [], [], []
        for uid, i in zip(batch[UID].to_pylist(), batch[SOURCE_INDEX].to_pylist()):
            if i % 5 == 0:
                records.append([])
                failures.append([{"response_type": "conversation", "reason": "llm_off_task", "detail": "-"}])
                off_task.append(True)
                continue
            kinds = ["conversation", "detailed"] + ([] if i % 2 else ["reasoning"])
            records.append([_record(uid, kind) for kind in kinds])
            failures.append(
                [{"response_type": "reasoning", "reason": "llm_unparseable", "detail": "-"}] if i % 2 else []
            )
            off_task.append(False)
        rejections.add(off_task, "llm_off_task")
        return rejections.attach(
            pa.table(
                {
                    INSTRUCTIONS: pa.array(records, pa.list_(RECORD_TYPE)),
                    INSTRUCTION_FAILURES: pa.array(failures, pa.list_(FAILURE_TYPE)),
                }
            )
        )

    def card_notes(self, view):
        return records_section(view, INSTRUCTIONS, "Scripted.")


def _record(uid: str, kind: str) -> dict:
    return {
        "id": f"{uid}-{kind}",
        "response_type": kind,
        "model": "script",
        "prompt_version": "1",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "That."}],
    }


@dataclass
class ScriptedSelect(Stage):
    """A caption selector without card notes: every third row gets a new caption."""

    name: ClassVar[str] = "scripted_select"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, CAPTION)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION, WEB_CAPTION, CAPTION_SOURCE)

    def __call__(self, batch: pa.Table) -> pa.Table:
        index, web = batch[SOURCE_INDEX].to_pylist(), batch[CAPTION].to_pylist()
        chosen = [f"a new caption {i}" if i % 3 == 0 else c for i, c in zip(index, web)]
        return pa.table(
            {
                CAPTION: pa.array(chosen, pa.string()),
                WEB_CAPTION: batch[CAPTION],
                CAPTION_SOURCE: pa.array(["synthetic" if i % 3 == 0 else "web" for i in index]),
            }
        )


def _run(tmp_path, name, stages, rows=300, output_dir=None):
    from pipelines.engine.runner import LocalRunner

    pool = tmp_path / "pool.csv"
    if not pool.exists():
        write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=rows, seed=5)
    raw = {
        "name": name,
        "input": str(pool),
        "output_dir": output_dir or str(tmp_path / "runs"),
        "shard_size": 100,
        "stages": stages,
    }
    plan, manifest = run_pipeline_dict(raw, LocalRunner())
    return Path(plan.run_uri), manifest


def _titles(run: Path) -> list[str]:
    return re.findall(r"^## (.+)$", (run / "README.md").read_text(), flags=re.MULTILINE)


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()
        return image.format == "PNG" and image.width > 100


def test_instruction_failures_in_kept_rows_and_rejects_are_counted_apart(tmp_path):
    run, manifest = _run(
        tmp_path, "instr", [{"stage": "curation.basic:JunkAltText"}, {"stage": f"{HERE}:ScriptedInstructions"}]
    )
    kept = read_phase(run, manifest.final_phase).to_pylist()
    odd = sum(r["source_index"] % 2 for r in kept)
    off_task = manifest.stage_totals()["scripted_instructions"].rejected["llm_off_task"]
    assert off_task > 0 and odd > 0
    card = (run / "README.md").read_text()
    assert (
        f"conversation {len(kept):,}, detailed {len(kept):,}, reasoning {len(kept) - odd:,}. "
        f"Rows rejected by the stage: llm_off_task {off_task:,}." in card
    )
    assert f"Response types that failed in rows kept for their others: llm_unparseable {odd:,}." in card
    assert _is_png(run / "card" / "scripted_instructions-instruction-types.png")
    assert "Sample pairs" in _titles(run) and not (run / "card" / "samples.png").exists()  # no images


def test_a_stage_without_notes_has_no_section_and_its_columns_still_show(tmp_path):
    run, _ = _run(tmp_path, "select", [{"stage": "curation.basic:JunkAltText"}, {"stage": f"{HERE}:ScriptedSelect"}])
    assert _titles(run) == ["Funnel", "Sample pairs", "What each stage removed: examples", "Provenance"]
    table = (run / "README.md").read_text().split("## Sample pairs")[1].split("\n## ")[0]
    assert "| uid | caption | caption from |" in table


def test_sections_without_their_stages_or_rows_are_left_out(tmp_path):
    run, _ = _run(tmp_path, "nothing-kept", [{"stage": "curation.basic:CaptionLength", "min_words": 500}])
    assert _titles(run) == ["Funnel", "What each stage removed: examples", "Provenance"]
    assert sorted(p.name for p in (run / "card").iterdir()) == ["funnel.png"]
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps(["a", "the", "of", "photo"]))
    run, manifest = _run(
        tmp_path, "match-only", [{"stage": "curation.metaclip:MetaclipMatch", "metadata": str(metadata)}]
    )
    assert _titles(run) == [
        "Funnel",
        "Sample pairs",
        "What the stages found",
        "What each stage removed: examples",
        "Provenance",
    ]
    section = (run / "README.md").read_text().split("### metaclip_match")[1].split("\n## ")[0]
    assert "The rows kept to the end match " in section and "the most matched: " in section


@dataclass
class BrokenNotes(Stage):
    """Writes nothing; its card section raises."""

    name: ClassVar[str] = "broken_notes"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)
    output_columns: ClassVar[tuple[str, ...]] = ()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.select([])

    def card_notes(self, view):
        raise RuntimeError("column went missing")


def test_a_failing_section_is_reported_and_the_rest_written(tmp_path, monkeypatch):
    import pipelines.card.writer

    def broken(*args, **kwargs):
        raise RuntimeError("column went missing")

    monkeypatch.setattr(pipelines.card.writer, "sample_rows", broken)
    run, _ = _run(tmp_path, "broken", [{"stage": "curation.basic:JunkAltText"}, {"stage": f"{HERE}:BrokenNotes"}])
    card = (run / "README.md").read_text()
    assert "*The card's samples section could not be written: RuntimeError('column went missing').*" in card
    assert "*The card's `broken_notes` section could not be written: RuntimeError('column went missing').*" in card
    assert _titles(run) == ["Funnel", "What the stages found", "What each stage removed: examples", "Provenance"]


def test_a_run_on_a_filesystem_polars_cannot_open_gets_the_same_card(tmp_path):
    """memory:// goes through fsspec: the card reads it through pyarrow datasets instead."""
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps(["a", "the", "of"]))
    stages = [
        {"stage": "curation.basic:JunkAltText"},
        {"stage": "curation.metaclip:MetaclipMatch", "metadata": str(metadata)},
        {"stage": f"{HERE}:ScriptedSelect"},
        {"stage": f"{HERE}:ScriptedInstructions"},
    ]
    cards = []
    for output in (str(tmp_path / "runs"), f"memory://vlmc-{uuid.uuid4().hex}/runs"):
        run, _ = _run(tmp_path, "anywhere", stages, output_dir=output)
        rundir = RunDir(str(run) if output.startswith("/") else f"{output}/anywhere")
        text = rundir.read_bytes(rundir.path("README.md")).decode()
        cards.append(re.sub(r"^(Status|Export).*$|`/[^`]*`", "", text, flags=re.MULTILINE))
    assert "could not be written" not in cards[0] and cards[0] == cards[1]
    assert re.findall(r"^#{2,3} (.+)$", cards[1], flags=re.MULTILINE) == [
        "Funnel",
        "Sample pairs",
        "What the stages found",
        "metaclip_match",
        "scripted_instructions",
        "What each stage removed: examples",
        "Provenance",
    ]


def test_captions_wrap_to_four_lines_with_an_ellipsis():
    lines = wrap("word " * 100).split("\n")
    assert len(lines) == 4 and lines[-1].endswith("…") and all(len(line) <= 34 for line in lines)
    assert wrap("short  caption\nhere") == "short caption here"


def test_contact_sheet_survives_an_undecodable_image():
    buffer = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(buffer, format="JPEG")
    png = contact_sheet_png([(buffer.getvalue(), "a grey card"), (b"not an image", "broken"), (None, "none")])
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width > 500
