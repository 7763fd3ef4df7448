"""Kill the driver with SIGKILL part-way through a multi-shard Ray run, rerun, compare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipelines.demo.pool import write_demo_pool
from tests.conftest import REPO_ROOT, TEXT_ONLY_HOST, read_phase, read_rejects, run_pipeline_dict

VLMCURATE = str(Path(sys.executable).parent / "vlmcurate")
SHARDS = 16


def _config(tmp_path, pool, name, seconds):
    return {
        "name": name, "input": str(pool), "output_dir": str(tmp_path / "runs"), "runner": "ray",
        "shard_size": 250,
        "stages": [
            {"stage": "curation.basic:JunkAltText"},
            {"stage": "tests.stages:Slow", "seconds": seconds},
            {"stage": "curation.exact_duplicates:ExactDuplicates"},
            {"stage": "tests.stages:Slow", "name": "slow_again", "seconds": seconds},
        ],
    }


def _kill_tree(process: subprocess.Popen, ray_temp: str) -> None:
    """SIGKILL the driver's process group, then any Ray process of its cluster that escaped it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ray_temp in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ledger(run_dir: Path, phase: str) -> set[str]:
    folder = run_dir / phase / "_ledger"
    return {p.name for p in folder.glob("*.json")} if folder.exists() else set()


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=SHARDS * 250 - 10, seed=7)
    config_path = tmp_path / "kill.yaml"
    config_path.write_text(yaml.safe_dump(_config(tmp_path, pool, "kill", seconds=0.4)))
    ray_temp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")
    command = [VLMCURATE, "run", str(config_path), "ray.num_cpus=2", f"ray.temp_dir={ray_temp}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run_dir = tmp_path / "runs" / "kill"
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.time() + 180
        while len(_ledger(run_dir, "01_slow")) < 3:
            assert process.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.1)
    finally:
        _kill_tree(process, ray_temp)
    done_before = _ledger(run_dir, "01_slow")
    assert 3 <= len(done_before) < SHARDS, "the kill must land part-way through the phase"
    mtimes = {name: (run_dir / "01_slow" / name.replace(".json", ".parquet")).stat().st_mtime_ns
              for name in done_before}
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
        __import__("pipelines.runner", fromlist=["LocalRunner"]).LocalRunner())
    final = reference.final_phase
    got, expected = read_phase(run_dir, final), read_phase(reference_plan.run_uri, final)
    assert len(set(got["uid"].to_pylist())) == got.num_rows  # no duplicate
    assert got.equals(expected)  # no missing uid, same rows
    assert read_rejects(run_dir).equals(read_rejects(reference_plan.run_uri))
