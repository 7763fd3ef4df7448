"""`vlmcurate run` on Ray in a subprocess, as a user runs it: what reaches the terminal, what the log keeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.demo.pool import write_demo_pool
from tests.conftest import REPO_ROOT, TEXT_ONLY_HOST

#: What Ray and its workers say during a run: Ray Data's INFO lines, the stage's worker output.
RAY_OUTPUT = [
    "streaming_executor.py",
    "execution finished",
    "noise from a worker on stdout",
    "noise from a worker on stderr",
    "noise from a worker's library logger",
    "noise from a worker's python warning",
]
#: What must never reach the terminal without -v.
RAY_MARKS = RAY_OUTPUT + ["core_worker.cc", "(MapWorker", "(raylet)", "INFO", "WARNING", "memory per worker"]


def _vlmcurate(*args: str) -> subprocess.CompletedProcess:
    vlmcurate = str(Path(sys.executable).parent / "vlmcurate")
    return subprocess.run([vlmcurate, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_ray_talks_into_the_log_file_and_to_the_terminal_only_with_verbose(tmp_path):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=400, seed=4)
    config = tmp_path / "terminal.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "terminal",
                "input": str(pool),
                "output_dir": str(tmp_path / "runs"),
                "runner": "ray",
                "shard_size": 200,
                "ray": {"num_cpus": 2},
                "stages": [{"stage": "curation.basic:CaptionLength"}, {"stage": "tests.stages:WorkerNoise"}],
            }
        )
    )

    quiet = _vlmcurate("run", str(config))
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    log = tmp_path / "runs" / "terminal" / "logs" / "vlmcurate.log"
    assert quiet.stdout.startswith("run terminal (ray runner") and f"logs: {log}" in quiet.stdout
    assert "ledger of run terminal (complete)" in quiet.stdout and "worker_noise" in quiet.stdout
    assert quiet.stderr == ""
    for mark in RAY_MARKS:
        assert mark not in quiet.stdout, mark
    written = log.read_text()
    for line in RAY_OUTPUT:
        assert line in written, line

    verbose = _vlmcurate("-v", "run", str(config), "name=terminal-v")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    for line in RAY_OUTPUT:
        assert line in verbose.stdout + verbose.stderr, line
    assert "logs:" not in verbose.stdout and not (tmp_path / "runs" / "terminal-v" / "logs").exists()
