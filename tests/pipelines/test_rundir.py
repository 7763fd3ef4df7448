"""Run directory I/O: atomic writes, ledger entries, temporaries, aggregates."""

from __future__ import annotations

import pickle

import pyarrow as pa

from pipelines.rundir import RunDir
from schemas.manifest import ShardEntry, StageCounts


def _entry(shard=0, rows=2):
    return ShardEntry("01_x", shard, rows, rows, {"x": StageCounts(rows, rows, {})})


def test_write_shard_is_atomic_and_marks_the_shard_done(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    rows = pa.table({"uid": ["a", "b"]})
    rundir.write_shard(_entry(), rows, pa.table({"uid": ["c"], "reason": ["r"]}))
    assert rundir.read_table(rundir.shard_path("01_x", 0)).equals(rows)
    assert rundir.read_table(rundir.rejects_path("01_x", 0))["uid"].to_pylist() == ["c"]
    assert list(rundir.shard_entries("01_x")) == [0]
    names = [p.name for p in (tmp_path / "run").rglob("*")]
    assert not any(".tmp-" in n for n in names)


def test_rewriting_a_shard_without_rejects_removes_the_old_rejects(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    rundir.write_shard(_entry(), pa.table({"uid": ["a"]}), pa.table({"uid": ["c"]}))
    rundir.write_shard(_entry(), pa.table({"uid": ["a"]}), None)
    assert not rundir.exists(rundir.rejects_path("01_x", 0))


def test_remove_temporaries_only_touches_hidden_temporaries(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    rundir.write_shard(_entry(), pa.table({"uid": ["a"]}), None)
    (tmp_path / "run" / "01_x" / ".00001.parquet.tmp-0123456789ab").write_bytes(b"half")
    (tmp_path / "run" / "01_x" / "notes.tmp-keep").write_bytes(b"user file")
    assert rundir.remove_temporaries() == 1
    assert (tmp_path / "run" / "01_x" / "notes.tmp-keep").exists()
    assert (tmp_path / "run" / "01_x" / "00000.parquet").exists()


def test_shard_entries_ignore_hidden_files_and_missing_phases(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    assert rundir.shard_entries("01_x") == {}
    rundir.write_shard(_entry(4), pa.table({"uid": ["a", "b"]}), None)
    (tmp_path / "run" / "01_x" / "_ledger" / ".00005.json.tmp-x").write_text("{")
    assert list(rundir.shard_entries("01_x")) == [4]


def test_aggregates_round_trip_and_rundir_pickles_small(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    assert rundir.load_aggregate("dedup") == (False, None)
    rundir.save_aggregate("dedup", {"duplicate_of": {3: "u1"}})
    assert rundir.load_aggregate("dedup") == (True, {"duplicate_of": {3: "u1"}})
    clone = pickle.loads(pickle.dumps(rundir))
    assert clone.root == rundir.root and len(pickle.dumps(rundir)) < 300
