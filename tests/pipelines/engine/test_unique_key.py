"""Tests of pipelines/engine/unique_key.py: a pool's own uids, repeated across shards, keep their
first occurrence under both runners and for every format; rewriting a shard survives a crash."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.engine.rundir import RunDir
from pipelines.engine.unique_key import REPEATS_FOLDER, RepeatsJob, reject_repeats
from tests.conftest import read_phase, read_rejects, run_pipeline_dict

ROWS = [(f"http://x.test/{i}.jpg", f"caption number {i}", f"u{i % 7}" if i % 3 else f"only-{i}") for i in range(40)]


def _pool(tmp_path, fmt: str) -> str:
    if fmt == "parquet":
        path = tmp_path / "pool.parquet"
        url, caption, key = zip(*ROWS)
        pq.write_table(pa.table({"url": url, "caption": caption, "key": key}), path, row_group_size=16)
    else:
        path = tmp_path / "pool.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption", "key"])
            writer.writerows(ROWS)
    return str(path)


def _run(tmp_path, fmt: str, runner):
    config = {
        "name": f"uids-{fmt}",
        "input": _pool(tmp_path, fmt),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 8,
        "columns": {"uid": "key"},
        "stages": [],
    }
    return run_pipeline_dict(config, runner)


def _first_seen() -> dict[int, int]:
    first: dict[str, int] = {}
    return {i: first.setdefault(key, i) for i, (_, _, key) in enumerate(ROWS)}


@pytest.mark.parametrize("kind", ["local", "ray"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_repeated_pool_uids_keep_their_first_occurrence(tmp_path, runner_factory, kind, fmt):
    plan, manifest = _run(tmp_path, fmt, runner_factory(kind))
    kept = read_phase(plan.run_uri, "00_input")
    first = _first_seen()
    repeats = [i for i, f in first.items() if f != i]
    assert kept["source_index"].to_pylist() == [i for i in range(len(ROWS)) if i not in repeats]
    assert len(set(kept["uid"].to_pylist())) == kept.num_rows
    rejects = read_rejects(plan.run_uri).sort_by("source_index")
    assert rejects["source_index"].to_pylist() == repeats
    assert set(rejects["reason"].to_pylist()) == {"duplicate_uid"}
    assert rejects["detail"].to_pylist() == [f"uid {ROWS[i][2]!r} first seen at input row {first[i]}" for i in repeats]
    counts = manifest.phases[0].counts["read"]
    assert (counts.rows_in, counts.rows_kept, counts.rejected) == (
        40,
        40 - len(repeats),
        {"duplicate_uid": len(repeats)},
    )


def test_rewriting_a_shard_again_after_a_crash_gives_the_same_files(tmp_path, runner_factory):
    plan, _ = _run(tmp_path, "csv", runner_factory("local"))
    rundir = RunDir(plan.run_uri)
    shard = 2  # rows 16-23: repeats of u2, u3, u5, ...
    rows_path, rejects_path = rundir.shard_path("00_input", shard), rundir.rejects_path("00_input", shard)
    done_rows, done_rejects = pq.read_table(rows_path), pq.read_table(rejects_path)
    entry = rundir.shard_entry("00_input", shard)
    job = RepeatsJob(rundir, "read", "uid")
    assert reject_repeats(job, entry) == entry  # done twice: the same
    assert pq.read_table(rows_path).equals(done_rows) and pq.read_table(rejects_path).equals(done_rejects)
    # A crash after the rejects were written but before the rows: the repeats are in both.
    moved = done_rejects.select(done_rows.column_names).cast(done_rows.schema)
    pq.write_table(pa.concat_tables([done_rows, moved]).sort_by("source_index"), rows_path)
    assert reject_repeats(job, entry) == entry
    assert pq.read_table(rows_path).equals(done_rows) and pq.read_table(rejects_path).equals(done_rejects)
    assert rundir.exists(rundir.path(REPEATS_FOLDER, "_done"))
