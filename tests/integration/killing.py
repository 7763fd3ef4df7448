"""Kill runs part-way through: the driver with its process group (``kill_after``), or one Ray
worker process while the run goes on (``WorkerKiller``)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.processes import descendants, process_title

VLMCURATE = str(Path(sys.executable).parent / "vlmcurate")


def finished_shards(run_dir: Path | str, phase: str) -> set[str]:
    """The ledger entries a phase has so far (a run directory on disk or at a URI)."""
    from pipelines.stage import RunFiles

    return {f"{shard:05d}.json" for shard in RunFiles(str(run_dir)).finished_shards(phase)}


def run_command(config_path: Path) -> list[str]:
    """``vlmcurate run`` on a local Ray of 2 CPUs with its own temp dir (to find its processes)."""
    ray_temp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    atexit.register(shutil.rmtree, ray_temp, ignore_errors=True)  # its Ray is gone by then
    return [VLMCURATE, "run", str(config_path), "ray.num_cpus=2", f"ray.temp_dir={ray_temp}"]


def kill_after(command: list[str], run_dir: Path | str, phase: str, shards: int, log: Path, env=None) -> set[str]:
    """Start the run, SIGKILL it (and its Ray) once ``shards`` shards of ``phase`` are done."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
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


# Killing one Ray worker while the run goes on. A local Ray's raylet is a child of the process
# that started it and starts every worker itself, so "a descendant of this process" finds only
# the workers of this test's own Ray, however many other Rays run on the machine.


def running_title(stage: str) -> str:
    """What the title of a Ray Data actor shows while it runs a batch of ``stage`` (see pipelines.engine.runner)."""
    return f"MapBatches({stage})).submit"


class WorkerKiller(threading.Thread):
    """SIGKILLs, one after the other, the Ray worker (below ``root``) first seen running each title
    fragment of ``targets``; then records the workers seen running that target afterwards.

    A worker is caught by its title while it executes a batch, so the kill lands mid-task: the
    batch is lost and Ray must restart the actor (or start another worker) and run the batch
    again. ``killed[target]`` is the pid killed; ``after[target]`` the pids seen running the
    target after the kill, so an entry there shows that a replacement did the work.
    """

    def __init__(self, targets: list[str], root: int | None = None, poll: float = 0.003, rescan: float = 0.2):
        super().__init__(daemon=True)
        self.targets, self.root, self.poll, self.rescan = list(targets), root or os.getpid(), poll, rescan
        self.killed: dict[str, int] = {}
        self.after: dict[str, set[int]] = {t: set() for t in targets}
        self._done = threading.Event()

    def run(self) -> None:
        workers: list[int] = []
        scanned = 0.0
        while not self._done.is_set():
            if time.monotonic() - scanned > self.rescan:
                workers = sorted(p for p in descendants(self.root) if process_title(p).startswith("ray::"))
                scanned = time.monotonic()
            for pid in workers:
                title = process_title(pid)
                for target in self.targets:
                    if target not in title:
                        continue
                    if target in self.killed:
                        if pid != self.killed[target]:
                            self.after[target].add(pid)
                    elif target == next(t for t in self.targets if t not in self.killed):
                        os.kill(pid, signal.SIGKILL)
                        self.killed[target] = pid
            time.sleep(self.poll)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)

    def __enter__(self) -> WorkerKiller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
