"""The llava export: images once per row with records, per-shard and merged stage JSON, checks, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generators.instruct.responses import record
from pipelines.engine.config import parse_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.rundir import RunDir
from pipelines.export.keys import sample_key
from pipelines.export.llava import finish_llava, write_llava_shard
from pipelines.export.shards import finish_export
from pipelines.job import build_plan
from schemas.columns import BRIEF_RECORDS, INSTRUCTIONS, KEEP_PROBABILITY
from schemas.llava import RECORD_TYPE
from tests.conftest import read_phase
from tests.http_server import ImageServer, make_image

RECORDS = pa.list_(RECORD_TYPE)


def assert_llava_file(path: Path, root: Path) -> list[dict]:
    """Load a LLaVA JSON file, check its format independently of schemas.llava and that each image
    exists relative to ``root`` (LLaVA's image folder); return the records."""
    records = json.loads(path.read_bytes())
    assert isinstance(records, list)
    for item in records:
        assert isinstance(item["id"], str) and item["id"]
        assert isinstance(item["image"], str) and not item["image"].startswith("/")
        assert (root / item["image"]).is_file()
        turns = item["conversations"]
        assert turns and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
        assert turns[0]["value"].count("<image>") == 1
        assert sum(t["value"].count("<image>") for t in turns) == 1
    return records


def _instruction(uid: str, kind: str) -> dict:
    return record(
        f"{uid}-{kind}",
        kind,
        [(f"What is shown in {uid}?", f"Picture {uid}."), ("More?", "No.")],
        model="grounded",
        prompt_version="grounded-1",
    )


def _brief(uid: str, n: int) -> dict:
    return record(
        f"{uid}-brief-{n}",
        "brief",
        [("Describe briefly.", f"caption {n} of {uid}")],
        model="caption",
        prompt_version="brief-1",
    )


def _rows() -> pa.Table:
    """Rows with 0-2 instruction and brief records: row 2 has none (so no image), row 5 a null brief list."""
    uids = [f"{i:032x}" for i in range(6)] + ["flickr/1000.jpg"]  # the last needs a hashed key
    kinds = ("conversation", "detailed", "reasoning")
    instructions = [[_instruction(u, k) for k in kinds[:n]] for u, n in zip(uids, [0, 1, 0, 2, 1, 2, 1])]
    briefs = [None if n is None else [_brief(u, j) for j in range(n)] for u, n in zip(uids, [1, 1, 0, 0, 0, None, 2])]
    n = len(uids)
    images = [make_image(24, 16, "PNG" if i == 3 else "JPEG", seed=i) for i in range(n)]
    return pa.table(
        {
            "uid": uids,
            "caption": [f"caption {i}" for i in range(n)],
            "image": images,
            INSTRUCTIONS: pa.array(instructions, RECORDS),
            BRIEF_RECORDS: pa.array(briefs, RECORDS),
        }
    )


def _export(root: Path, rows: pa.Table, cuts: tuple[int, ...] = (0, 4)) -> Path:
    """Write ``rows`` as llava export shards starting at ``cuts``, then finish; return the llava folder."""
    rundir = RunDir(str(root))
    bounds = [*cuts, rows.num_rows]
    counts = [
        (i, bounds[i + 1] - start, write_llava_shard(rundir, "export", i, rows.slice(start, bounds[i + 1] - start)))
        for i, start in enumerate(cuts)
    ]
    finish_export(rundir, "export", {"formats": ["llava"], "phase": "01_x"}, counts)
    return root / "export" / "llava"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_images_are_written_once_per_row_with_records(tmp_path):
    rows = _rows()
    folder = _export(tmp_path, rows)
    expected = {}
    for i, (uid, image) in enumerate(zip(rows["uid"].to_pylist(), rows["image"].to_pylist())):
        if i == 2:
            continue
        ext = "png" if i == 3 else "jpg"
        expected[f"images/{i // 4:05d}/{sample_key(uid)}.{ext}"] = image
    images = {k: v for k, v in _files(folder).items() if k.startswith("images/")}
    assert images == expected  # no image for row 2, bytes as given
    assert f"images/00001/{sample_key('flickr/1000.jpg')}.jpg" in images


def test_stage_files_hold_every_record_and_merge_the_shards(tmp_path):
    rows = _rows()
    folder = _export(tmp_path, rows)
    for stage, column in (("stage1", BRIEF_RECORDS), ("stage2", INSTRUCTIONS)):
        merged = assert_llava_file(folder / f"{stage}.json", folder)
        assert len(merged) == sum(len(r or []) for r in rows[column].to_pylist())
        shards = [assert_llava_file(folder / stage / f"{i:05d}.json", folder) for i in range(2)]
        assert merged == shards[0] + shards[1]
        assert [r["id"] for r in merged] == [r["id"] for rs in rows[column].to_pylist() for r in rs or []]
        for item in merged:
            assert (folder / item["image"]).is_file()
            assert item["image"].startswith("images/") and item["meta"]["model"] in ("grounded", "caption")
    counts = json.loads((folder / "counts.json").read_text())
    assert {k: counts[k] for k in ("images", "stage1", "stage2")} == {"images": 6, "stage1": 4, "stage2": 7}
    assert counts["shards"]["00001"] == {"images": 3, "stage1": 2, "stage2": 4}


def test_keep_probabilities_reach_the_vlm_trainer_through_meta(tmp_path):
    from models.training.llava_data import iter_vlm_file

    rows = _rows()
    chances = [1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 0.125]
    rows = rows.append_column(KEEP_PROBABILITY, pa.array(chances, pa.float32()))
    folder = _export(tmp_path, rows)
    by_id = {s.id: s.keep_probability for f in sorted((folder / "stage2").glob("*.json")) for s in iter_vlm_file(f)}
    expected = {r["id"]: p for rs, p in zip(rows[INSTRUCTIONS].to_pylist(), chances) for r in rs or []}
    assert by_id == expected
    merged = json.loads((folder / "stage2.json").read_text())
    assert all(("keep_probability" in r["meta"]) == (expected[r["id"]] < 1) for r in merged)


def test_merge_handles_empty_shards_and_only_one_stage(tmp_path):
    rows = _rows().drop_columns([BRIEF_RECORDS])
    empty = rows.slice(0, 0)
    rundir = RunDir(str(tmp_path))
    counts = [
        (0, 0, write_llava_shard(rundir, "export", 0, empty)),
        (1, 7, write_llava_shard(rundir, "export", 1, rows)),
        (2, 0, write_llava_shard(rundir, "export", 2, empty)),
    ]
    finish_export(rundir, "export", {"formats": ["llava"], "phase": "01_x"}, counts)
    folder = tmp_path / "export" / "llava"
    assert not (folder / "stage1.json").exists() and not (folder / "stage1").exists()
    assert (folder / "stage2" / "00000.json").read_bytes() == b"[]\n"
    assert (folder / "stage2.json").read_bytes() == (folder / "stage2" / "00001.json").read_bytes()
    assert len(assert_llava_file(folder / "stage2.json", folder)) == 7
    assert json.loads((folder / "counts.json").read_text())["images"] == 5  # rows 1, 3, 4, 5 and 6


def test_nothing_kept_gives_empty_lists(tmp_path):
    rundir = RunDir(str(tmp_path))
    (tmp_path / "01_x").mkdir()
    pq.write_table(_rows().slice(0, 0), tmp_path / "01_x" / "00000.parquet")
    finish_llava(rundir, "export", "01_x", [])
    folder = tmp_path / "export" / "llava"
    assert (folder / "stage1.json").read_bytes() == (folder / "stage2.json").read_bytes() == b"[]\n"
    assert json.loads((folder / "counts.json").read_text()) == {"images": 0, "stage1": 0, "stage2": 0, "shards": {}}


def test_same_rows_give_byte_identical_files(tmp_path):
    first, second = _export(tmp_path / "a", _rows()), _export(tmp_path / "b", _rows())
    assert _files(first) == _files(second)
    assert not [p for p in first.rglob(".*")]  # no temporaries left


def test_missing_columns_and_invalid_records_are_clear_errors(tmp_path):
    rundir = RunDir(str(tmp_path))
    with pytest.raises(ValueError, match="InstructGenerate.*drop llava"):
        write_llava_shard(rundir, "export", 0, _rows().drop_columns([BRIEF_RECORDS, INSTRUCTIONS]))
    with pytest.raises(ValueError, match="needs the image column"):
        write_llava_shard(rundir, "export", 0, _rows().drop_columns(["image"]))
    rows = _rows().to_pylist()
    bad = rows[1][INSTRUCTIONS][0]
    bad["conversations"][0]["value"] = bad["conversations"][0]["value"].replace("<image>\n", "")
    table = pa.Table.from_pylist(rows, schema=_rows().schema)
    with pytest.raises(ValueError, match=f"record '{bad['id']}'.*image_token_misplaced"):
        write_llava_shard(rundir, "export", 0, table)
    rows = _rows().to_pylist()
    rows[0]["image"] = None
    with pytest.raises(ValueError, match="has records but no image"):
        write_llava_shard(rundir, "export", 0, pa.Table.from_pylist(rows, schema=_rows().schema))
    assert not (tmp_path / "export").exists()  # records are checked before anything is written


def test_formats_accept_llava():
    config = parse_config({"name": "x", "input": "pool.csv", "export": {"formats": ["llava", "parquet"]}})
    assert config.export.formats == ["llava", "parquet"]


def test_pipeline_exports_llava_from_the_instruct_stages(tmp_path, runner_factory):
    server = ImageServer()
    runs = {}
    try:
        pool = tmp_path / "pool.csv"
        with open(pool, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for i in range(9):
                caption = "" if i == 4 else f"A red bus number {i} parked on a street."
                writer.writerow([server.add(f"{i}.jpg", make_image(48, 32, seed=i)), caption])
        for kind in ("local", "ray"):
            config = {
                "name": "llava",
                "input": str(pool),
                "output_dir": str(tmp_path / kind),
                "shard_size": 4,
                "stages": [
                    {"stage": "pipelines.download:Download", "allow_addresses": ["127.0.0.1"], "threads": 2},
                    {"stage": "generators.instruct.stage:InstructGenerate"},
                    {"stage": "generators.instruct.stage:BriefDescriptions"},
                ],
                "export": {"samples_per_shard": 3, "formats": ["llava"]},
            }
            plan = build_plan(parse_config(config))
            runs[kind] = plan, run_pipeline(plan, runner_factory(kind))
    finally:
        server.close()
    plan, manifest = runs["local"]
    kept = read_phase(plan.run_uri, manifest.final_phase)
    assert kept.num_rows == 8  # the empty caption is rejected
    folder = tmp_path / "local" / "llava" / "export" / "llava"
    stage1, stage2 = (assert_llava_file(folder / f"stage{n}.json", folder) for n in (1, 2))
    assert len(stage1) == 8 and len(stage2) == 24  # a brief record per caption, three response types per row
    by_uid = dict(zip(kept["uid"].to_pylist(), kept["image"].to_pylist()))
    for item in stage1 + stage2:
        uid = item["id"].split("-", 1)[0]
        assert (folder / item["image"]).read_bytes() == by_uid[uid]
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["00000", "00001", "00002"]
    assert json.loads((folder / "counts.json").read_text())["images"] == 8
    assert manifest.export["formats"] == ["llava"] and manifest.export["shards"] == 3
    assert _files(folder) == _files(tmp_path / "ray" / "llava" / "export" / "llava")  # same bytes on Ray
