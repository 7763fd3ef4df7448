"""Read-only access to a run directory: what a stage may read of an earlier run."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from pipelines.engine.ledger import summarise
from pipelines.engine.rundir import RunDir
from pipelines.stage import RunFiles
from schemas.manifest import Manifest, ShardEntry


def _run(tmp_path, status):
    rundir = RunDir(str(tmp_path / "earlier"))
    entries = {}
    for shard in (1, 0):
        entries[shard] = ShardEntry(phase="01_x", shard=shard, rows_in=1, rows_out=1, stages={})
        rundir.write_shard(entries[shard], pa.table({"uid": [f"u{shard}"]}), None)
    manifest = Manifest(name="earlier", config_hash="h", config={}, versions={}, created_at="t", updated_at="t")
    manifest.status = status
    manifest.phases = [summarise("01_x", [], entries, 2)]
    rundir.write_manifest(manifest)
    return rundir


def test_kept_files_of_a_completed_run_in_shard_order(tmp_path):
    _run(tmp_path, "complete")
    files = RunFiles(str(tmp_path / "earlier")).kept_files()
    assert [f.rsplit("/", 1)[1] for f in files] == ["00000.parquet", "00001.parquet"]


def test_an_unfinished_run_is_refused_by_name(tmp_path):
    _run(tmp_path, "running")
    with pytest.raises(ValueError, match="is not a completed run"):
        RunFiles(str(tmp_path / "earlier")).kept_files()


def test_a_reader_travels_as_its_uri_and_the_engine_writer_is_one(tmp_path):
    reader = pickle.loads(pickle.dumps(RunFiles(str(tmp_path))))
    assert type(reader) is RunFiles and reader.uri == str(tmp_path)
    assert type(pickle.loads(pickle.dumps(RunDir(str(tmp_path))))) is RunDir
