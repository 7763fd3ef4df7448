"""Run directory I/O: atomic writes, ledger entries, temporaries, aggregates, other filesystems."""

from __future__ import annotations

import pickle
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipelines.demo.pool import write_demo_pool
from pipelines.engine.rundir import RunDir, RunDirInUse
from pipelines.engine.runner import LocalRunner
from schemas.manifest import ShardEntry, StageCounts
from tests.conftest import TEXT_ONLY_HOST, run_pipeline_dict


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


# Other filesystems ---------------------------------------------------------------------------------


def test_a_file_uri_is_the_local_directory_and_can_be_locked(tmp_path):
    rundir = RunDir(f"file://{tmp_path}/run")
    assert isinstance(rundir.fs, pafs.LocalFileSystem) and rundir.root == f"{tmp_path}/run"
    rundir.write_shard(_entry(), pa.table({"uid": ["a"]}), None)
    assert (tmp_path / "run" / "01_x" / "00000.parquet").exists()
    assert rundir.uri_of(rundir.shard_path("01_x", 0)) == f"{tmp_path}/run/01_x/00000.parquet"  # polars opens it
    with rundir.lock(), pytest.raises(RunDirInUse):
        with RunDir(str(tmp_path / "run")).lock():  # the same directory by its plain path
            pass


def test_an_fsspec_only_scheme_holds_a_whole_run_directory():
    """memory:// is not a pyarrow filesystem: it goes through fsspec (and lives in this process only)."""
    uri = f"memory://vlmc-{uuid.uuid4().hex}/run"
    rundir = RunDir(uri)
    assert isinstance(rundir.fs, pafs.PyFileSystem)
    rows = pa.table({"uid": ["a", "b"]})
    rundir.write_shard(_entry(3), rows, pa.table({"uid": ["c"]}))
    rundir.save_aggregate("dedup", {"k": 1})
    clone = pickle.loads(pickle.dumps(rundir))  # as a worker in this process would get it
    assert clone.read_table(clone.shard_path("01_x", 3)).equals(rows)
    assert list(clone.shard_entries("01_x")) == [3] and clone.has_shard_entries()
    assert clone.load_aggregate("dedup") == (True, {"k": 1})
    assert clone.uri_of(clone.shard_path("01_x", 3)).startswith("memory://")
    with clone.lock():  # no file locks there: a no-op
        assert clone.remove_temporaries() == 0
    assert RunDir(f"memory://vlmc-{uuid.uuid4().hex}/run").shard_entries("01_x") == {}


def test_a_pipeline_writes_the_same_rows_to_memory_as_to_a_local_folder(tmp_path):
    """The whole driver (shards, ledger, aggregates, export) on a run directory pyarrow cannot open itself."""
    pool = tmp_path / "pool.csv"
    lines = write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=600, seed=4)
    raw = {
        "name": "run",
        "input": str(pool),
        "shard_size": 150,
        "export": {"formats": ["parquet"]},
        "stages": [{"stage": "curation.basic:JunkAltText"}, {"stage": "curation.dedup:ExactDuplicates"}],
    }
    kept = {}
    for output in (str(tmp_path / "runs"), f"memory://vlmc-{uuid.uuid4().hex}/runs"):
        plan, manifest = run_pipeline_dict({**raw, "output_dir": output}, LocalRunner())
        assert manifest.status == "complete" and manifest.export["shards"] == 1
        rundir = RunDir(plan.run_uri)
        assert rundir.read_manifest().status == "complete"
        files = rundir.parquet_files(manifest.final_phase)
        assert len(files) == -(-lines // 150)
        kept[output] = pa.concat_tables([rundir.read_table(f) for f in files])
        assert rundir.parquet_files("export/parquet") and rundir.exists(rundir.path("README.md"))  # export, card
    local, memory = kept.values()
    assert local.num_rows > 0 and local.equals(memory)


def test_a_scheme_no_filesystem_knows_is_a_config_error():
    with pytest.raises(ValueError, match="nosuchfs://x/run: neither pyarrow nor fsspec"):
        RunDir("nosuchfs://x/run")


def test_on_an_object_store_a_file_is_put_whole_or_not_at_all():
    rundir = RunDir(f"memory://vlmc-{uuid.uuid4().hex}/run")
    assert not rundir.renames_atomically and RunDir(".").renames_atomically
    with pytest.raises(RuntimeError, match="stopped mid-write"):
        with rundir.open_output(rundir.path("01_x", "00000.parquet")) as out:
            out.write(b"half a file")
            raise RuntimeError("stopped mid-write")
    assert rundir.list_files("01_x") == []  # nothing, not a partial object
    rundir.write_bytes(rundir.path("01_x", "00001.json"), b"{}")
    assert [f.base_name for f in rundir.list_files("01_x")] == ["00001.json"]  # no temporary beside it
