"""Run ``vlmcurate run`` in its own process group and SIGKILL it part-way through a phase."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import REPO_ROOT

VLMCURATE = str(Path(sys.executable).parent / "vlmcurate")


def finished_shards(run_dir: Path, phase: str) -> set[str]:
    folder = run_dir / phase / "_ledger"
    return {p.name for p in folder.glob("*.json")} if folder.exists() else set()


def run_command(config_path: Path) -> list[str]:
    """``vlmcurate run`` on a local Ray of 2 CPUs with its own temp dir (to find its processes)."""
    ray_temp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")
    return [VLMCURATE, "run", str(config_path), "ray.num_cpus=2", f"ray.temp_dir={ray_temp}"]


def kill_after(command: list[str], run_dir: Path, phase: str, shards: int, log: Path, env=None) -> set[str]:
    """Start the run, SIGKILL it (and its Ray) once ``shards`` shards of ``phase`` are done."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.time() + 180
            while len(finished_shards(run_dir, phase)) < shards:
                assert process.poll() is None, log.read_text()
                assert time.time() < deadline, "the run made no progress"
                time.sleep(0.05)
        finally:
            _kill_tree(process, command[-1].split("=", 1)[1])
    return finished_shards(run_dir, phase)


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
