"""ExactDuplicates through whole pipeline runs: survivors, reject details, keys, normalisation, runners."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.dedup import DUPLICATE, ExactDuplicates
from pipelines.engine.runner import LocalRunner
from tests.conftest import read_phase, read_rejects, run_pipeline_dict

# (url, caption) by source_index. With shard_size=2 the copies of row 0 sit in shards 1, 2 and 3.
POOL = [
    ("http://a.test/1.jpg", "a dog on a lawn"),  # 0  first of group A
    ("http://a.test/2.jpg", "a cat on a mat"),  # 1  first of group B
    ("http://a.test/1.jpg", "a dog on a lawn"),  # 2  copy of 0
    ("http://a.test/3.jpg", "a dog on a lawn"),  # 3  same caption as 0, other url
    ("http://a.test/2.jpg", "a cat on a mat"),  # 4  copy of 1
    ("http://a.test/1.jpg", "A  Dog on a\tLAWN "),  # 5  case/whitespace variant of 0
    ("http://a.test/1.jpg", "a dog on a lawn"),  # 6  another copy of 0
    ("http://a.test/4.jpg", "a bird in a tree"),  # 7  unique
]


def write_pool(folder: Path, rows: list[tuple[str, str]], name: str = "pool.parquet", **extra) -> Path:
    path = folder / name
    columns = {"url": [u for u, _ in rows], "caption": [c for _, c in rows], **extra}
    pq.write_table(pa.table(columns), path)
    return path


def config(
    tmp_path: Path, pool: Path, *, name: str = "dedup", shard_size: int = 2, stages=None, **dedup_params
) -> dict:
    return {
        "name": name,
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": shard_size,
        "stages": stages if stages is not None else [{"stage": "curation.dedup:ExactDuplicates", **dedup_params}],
    }


def uid_by_index(plan) -> dict[int, str]:
    table = read_phase(plan.run_uri, "00_input")
    return dict(zip(table["source_index"].to_pylist(), table["uid"].to_pylist()))


def duplicate_map(plan) -> dict[int, int]:
    """{source_index of a rejected copy: source_index of the row it duplicates}."""
    index_of = {u: i for i, u in uid_by_index(plan).items()}
    rejects = read_rejects(plan.run_uri)
    if rejects is None:
        return {}
    result = {}
    for record in rejects.to_pylist():
        if record["stage"] != "exact_duplicates":
            continue
        assert record["reason"] == DUPLICATE
        detail = json.loads(record["detail"])
        assert set(detail) == {"duplicate_of", "cluster_size", "keep"}
        result[record["source_index"]] = index_of[detail["duplicate_of"]]
    return result


def kept_indices(plan) -> list[int]:
    return read_phase(plan.run_uri, plan.phase_names[-1])["source_index"].to_pylist()


def test_first_occurrence_survives_across_shards(tmp_path):
    pool = write_pool(tmp_path, POOL)
    plan, manifest = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    assert manifest.status == "complete"
    assert plan.phase_names == ["00_input", "01_exact_duplicates"]
    assert manifest.phases[0].shards_total == 4

    assert duplicate_map(plan) == {2: 0, 4: 1, 6: 0}
    assert kept_indices(plan) == [0, 1, 3, 5, 7]
    assert set(read_rejects(plan.run_uri)["stage"].to_pylist()) == {"exact_duplicates"}

    uids = uid_by_index(plan)
    rejects = read_rejects(plan.run_uri)
    by_uid = {r["uid"]: r for r in rejects.to_pylist()}
    assert json.loads(by_uid[uids[6]]["detail"]) == {"duplicate_of": uids[0], "cluster_size": 3, "keep": "first"}
    assert json.loads(by_uid[uids[4]]["detail"]) == {"duplicate_of": uids[1], "cluster_size": 2, "keep": "first"}
    # Reject records say which shard the copy was in and carry its light columns.
    assert by_uid[uids[2]]["shard"] == 1 and by_uid[uids[6]]["shard"] == 3
    assert by_uid[uids[2]]["url"] == POOL[2][0] and by_uid[uids[2]]["caption"] == POOL[2][1]

    counts = manifest.stage_totals()["exact_duplicates"]
    assert counts.rows_in == 8 and counts.rows_kept == 5 and counts.rejected == {DUPLICATE: 3}
    assert counts.closes


def test_each_shard_decides_from_its_own_part_of_the_decision(tmp_path):
    pool = write_pool(tmp_path, POOL)
    plan, _ = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    folder = Path(plan.run_uri, "decisions", "exact_duplicates")
    parts: dict[str, list[int]] = {}
    for path in folder.glob("*/*.parquet"):
        parts.setdefault(path.parent.name, []).extend(pq.read_table(path)["source_index"].to_pylist())
    assert parts == {"00001": [2], "00002": [4], "00003": [6]}  # shards of two rows: no shard holds another's
    saved = Path(plan.run_uri, "aggregates", "exact_duplicates.pkl")
    assert saved.stat().st_size < 2000  # the summary alone: no row of the decision
    # A run whose aggregate was saved before decisions were written by shard computes it again.
    (folder / "_done").unlink()
    shutil.rmtree(folder / "00003")
    shutil.rmtree(Path(plan.run_uri, "01_exact_duplicates"))
    shutil.rmtree(Path(plan.run_uri, "rejects", "01_exact_duplicates"))
    plan, _ = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    assert duplicate_map(plan) == {2: 0, 4: 1, 6: 0} and (folder / "_done").exists()


def test_describe_reports_counts(tmp_path):
    pool = write_pool(tmp_path, POOL)
    _, manifest = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    assert manifest.aggregates["exact_duplicates"] == {
        "duplicate_rows": 3,
        "keep": "first",
        "rows": 8,
        "edges": 3,
        "clusters": 2,
        "largest": [3, 2],
        "size_histogram": {"2": 1, "3": 1},
        "keys": ["url", "caption"],
    }


def test_keys_caption_only(tmp_path):
    pool = write_pool(tmp_path, POOL)
    plan, manifest = run_pipeline_dict(config(tmp_path, pool, keys=["caption"]), LocalRunner())
    assert duplicate_map(plan) == {2: 0, 3: 0, 4: 1, 6: 0}
    assert kept_indices(plan) == [0, 1, 5, 7]
    assert manifest.aggregates["exact_duplicates"]["keys"] == ["caption"]
    assert manifest.aggregates["exact_duplicates"]["largest"] == [4, 2]


def test_keys_url_only(tmp_path):
    pool = write_pool(tmp_path, POOL)
    plan, _ = run_pipeline_dict(config(tmp_path, pool, keys=["url"]), LocalRunner())
    assert duplicate_map(plan) == {2: 0, 4: 1, 5: 0, 6: 0}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["url", "caption"], {2: 0, 4: 1, 5: 0, 6: 0}),
        (["caption"], {2: 0, 3: 0, 4: 1, 5: 0, 6: 0}),
    ],
)
def test_normalize_text_merges_case_and_whitespace_variants(tmp_path, keys, expected):
    pool = write_pool(tmp_path, POOL)
    plan, _ = run_pipeline_dict(config(tmp_path, pool, keys=keys, normalize_text=True), LocalRunner())
    assert duplicate_map(plan) == expected


def test_key_boundaries_do_not_collide(tmp_path):
    # Concatenating the keys would make these rows equal; hashing rows must keep them apart.
    rows = [("http://x.test/ab", "c d e"), ("http://x.test/a", "bc d e"), ("http://x.test/ab", "c d e")]
    pool = write_pool(tmp_path, rows)
    plan, _ = run_pipeline_dict(config(tmp_path, pool, shard_size=1), LocalRunner())
    assert duplicate_map(plan) == {2: 0}


def test_pool_without_duplicates(tmp_path):
    rows = [(f"http://x.test/{i}.jpg", f"caption number {i}") for i in range(7)]
    pool = write_pool(tmp_path, rows)
    plan, manifest = run_pipeline_dict(config(tmp_path, pool, shard_size=3), LocalRunner())
    assert kept_indices(plan) == list(range(7))
    assert read_rejects(plan.run_uri) is None
    assert manifest.stage_totals()["exact_duplicates"].rejected == {}
    assert manifest.aggregates["exact_duplicates"] == {
        "duplicate_rows": 0,
        "keep": "first",
        "rows": 7,
        "edges": 0,
        "clusters": 0,
        "largest": [],
        "size_histogram": {},
        "keys": ["url", "caption"],
    }


def test_single_row_pool(tmp_path):
    pool = write_pool(tmp_path, [("http://x.test/only.jpg", "the only row")])
    plan, manifest = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    assert manifest.status == "complete"
    assert kept_indices(plan) == [0]
    assert read_rejects(plan.run_uri) is None
    assert manifest.aggregates["exact_duplicates"]["duplicate_rows"] == 0


def test_earlier_rejection_lets_the_next_copy_survive(tmp_path):
    # Row 0 (a file-name caption) leaves before deduplication on url: row 2 is then the first copy.
    rows = [
        ("http://x.test/1", "IMG_0001.jpg"),
        ("http://x.test/2", "a red car"),
        ("http://x.test/1", "a red car close up"),
        ("http://x.test/1", "the same red car again"),
    ]
    pool = write_pool(tmp_path, rows)
    stages = [
        {"stage": "curation.basic:JunkAltText", "rules": ["filename_caption"]},
        {"stage": "curation.dedup:ExactDuplicates", "keys": ["url"]},
    ]
    plan, manifest = run_pipeline_dict(config(tmp_path, pool, stages=stages), LocalRunner())
    assert plan.phase_names == ["00_input", "01_junk_alt_text", "02_exact_duplicates"]
    assert kept_indices(plan) == [1, 2]
    assert duplicate_map(plan) == {3: 2}
    totals = manifest.stage_totals()
    assert totals["junk_alt_text"].rejected == {"filename_caption": 1}
    assert totals["exact_duplicates"].rows_in == 3
    assert totals["exact_duplicates"].rejected == {DUPLICATE: 1}

    # Without the junk rule, row 0 is the first copy.
    stages[0]["rules"] = ["url_caption"]
    plan, _ = run_pipeline_dict(config(tmp_path, pool, name="dedup2", stages=stages), LocalRunner())
    assert kept_indices(plan) == [0, 1]
    assert duplicate_map(plan) == {2: 0, 3: 0}


def test_second_run_reuses_the_saved_decision(tmp_path):
    pool = write_pool(tmp_path, POOL)
    plan, _ = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    first = (kept_indices(plan), duplicate_map(plan))
    plan, manifest = run_pipeline_dict(config(tmp_path, pool), LocalRunner())
    assert manifest.status == "complete"
    assert (kept_indices(plan), duplicate_map(plan)) == first


def test_keys_must_not_be_empty():
    with pytest.raises(ValueError, match="keys must name at least one column"):
        ExactDuplicates(keys=[])


def test_local_and_ray_runners_agree(tmp_path, runner_factory):
    rows = POOL * 3 + [(f"http://y.test/{i}", f"unique caption {i}") for i in range(10)]
    pool = write_pool(tmp_path, rows)
    results = {}
    for kind in ("local", "ray"):
        raw = config(tmp_path, pool, name=f"dedup-{kind}", shard_size=5, keys=["caption"], normalize_text=True)
        plan, manifest = run_pipeline_dict(raw, runner_factory(kind))
        assert manifest.status == "complete"
        kept = read_phase(plan.run_uri, plan.phase_names[-1])
        rejects = read_rejects(plan.run_uri)
        results[kind] = (
            kept["uid"].to_pylist(),
            sorted(zip(rejects["uid"].to_pylist(), rejects["detail"].to_pylist(), rejects["shard"].to_pylist())),
            manifest.stage_totals()["exact_duplicates"].to_dict(),
            manifest.aggregates["exact_duplicates"],
        )
    assert results["local"] == results["ray"]
    kept_uids = results["local"][0]
    assert len(kept_uids) == 3 + 10  # one of each normalised caption of POOL, plus the unique rows


def test_every_row_rejected_before_deduplication(tmp_path):
    pool = write_pool(tmp_path, [("http://x.test/1", "IMG_0001.jpg"), ("http://x.test/2", "DSC_0002.png")])
    stages = [{"stage": "curation.basic:JunkAltText"}, {"stage": "curation.dedup:ExactDuplicates"}]
    plan, manifest = run_pipeline_dict(config(tmp_path, pool, shard_size=1, stages=stages), LocalRunner())
    assert manifest.status == "complete"
    assert kept_indices(plan) == []
    assert manifest.aggregates["exact_duplicates"]["duplicate_rows"] == 0


def test_summary_of_partitions_without_rows():
    summary = ExactDuplicates().summarise([{}, {}])  # partitions that held no rows
    assert summary["rows"] == summary["clusters"] == summary["duplicate_rows"] == 0 and summary["largest"] == []


def test_input_uids_shared_by_copies_keep_the_first(tmp_path):
    rows = [
        ("http://x.test/1", "a dog on a lawn"),
        ("http://x.test/2", "a cat"),
        ("http://x.test/1", "a dog on a lawn"),
    ]
    pool = write_pool(tmp_path, rows, id=["same", "other", "same"])
    raw = config(tmp_path, pool)
    raw["columns"] = {"uid": "id"}
    plan, _ = run_pipeline_dict(raw, LocalRunner())
    assert kept_indices(plan) == [0, 1]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_copies_of_an_earlier_runs_rows_are_rejected_naming_the_earlier_row(tmp_path, runner_factory, kind):
    earlier_pool = write_pool(tmp_path, [POOL[0], POOL[1]], name="earlier.parquet")
    earlier, _ = run_pipeline_dict(config(tmp_path, earlier_pool, name="earlier"), runner_factory(kind))
    earlier_uids = dict(
        zip(*[read_phase(earlier.run_uri, "01_exact_duplicates")[c].to_pylist() for c in ("url", "uid")])
    )
    pool = write_pool(tmp_path, POOL)
    plan, manifest = run_pipeline_dict(
        config(tmp_path, pool, name="later", against=[earlier.run_uri]), runner_factory(kind)
    )
    # Every copy of POOL[0] and POOL[1], the first ones included, duplicates the earlier run's row.
    assert kept_indices(plan) == [3, 5, 7]
    rejects = {r["source_index"]: json.loads(r["detail"]) for r in read_rejects(plan.run_uri).to_pylist()}
    assert {i: d["duplicate_of"] for i, d in rejects.items()} == {
        0: earlier_uids[POOL[0][0]],
        1: earlier_uids[POOL[1][0]],
        2: earlier_uids[POOL[0][0]],
        4: earlier_uids[POOL[1][0]],
        6: earlier_uids[POOL[0][0]],
    }
    summary = manifest.aggregates["exact_duplicates"]
    assert summary["earlier_rows"] == 2 and summary["duplicates_of_earlier_runs"] == 5 and summary["rows"] == 8
