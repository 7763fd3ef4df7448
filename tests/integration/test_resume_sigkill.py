"""Kill the driver with SIGKILL part-way through a multi-shard Ray run, rerun, compare."""

from __future__ import annotations

import os
import subprocess

import pyarrow.parquet as pq
import yaml

from pipelines.demo.pool import write_demo_pool
from tests.conftest import REPO_ROOT, TEXT_ONLY_HOST, read_phase, read_rejects, run_pipeline_dict
from tests.integration.killing import finished_shards, kill_after, run_command

SHARDS = 16


def _config(tmp_path, pool, name, seconds):
    return {
        "name": name,
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "runner": "ray",
        "shard_size": 250,
        "stages": [
            {"stage": "curation.basic:JunkAltText"},
            {"stage": "tests.stages:Slow", "seconds": seconds},
            {"stage": "curation.dedup:ExactDuplicates"},
            {"stage": "tests.stages:Slow", "name": "slow_again", "seconds": seconds},
        ],
    }


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=SHARDS * 250 - 10, seed=7)
    config_path = tmp_path / "kill.yaml"
    config_path.write_text(yaml.safe_dump(_config(tmp_path, pool, "kill", seconds=0.4)))
    command = run_command(config_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run_dir = tmp_path / "runs" / "kill"
    kill_after(command, run_dir, "01_slow", 3, tmp_path / "first.log", env=env)
    done_before = finished_shards(run_dir, "01_slow")
    assert 3 <= len(done_before) < SHARDS, "the kill must land part-way through the phase"
    mtimes = {
        name: (run_dir / "01_slow" / name.replace(".json", ".parquet")).stat().st_mtime_ns for name in done_before
    }
    # Nothing partial is visible: every parquet file a reader can see is complete.
    for path in run_dir.rglob("*.parquet"):
        assert not path.name.startswith(".")
        pq.read_table(path)

    resumed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for name, mtime in mtimes.items():  # finished shards were not redone
        assert (run_dir / "01_slow" / name.replace(".json", ".parquet")).stat().st_mtime_ns == mtime
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]

    reference_plan, reference = run_pipeline_dict(
        {**_config(tmp_path, pool, "reference", seconds=0), "runner": "local"},
        __import__("pipelines.engine.runner", fromlist=["LocalRunner"]).LocalRunner(),
    )
    final = reference.final_phase
    got, expected = read_phase(run_dir, final), read_phase(reference_plan.run_uri, final)
    assert len(set(got["uid"].to_pylist())) == got.num_rows  # no duplicate
    assert got.equals(expected)  # no missing uid, same rows
    assert read_rejects(run_dir).equals(read_rejects(reference_plan.run_uri))
