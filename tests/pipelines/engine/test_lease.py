"""One run at a time on a run directory without file locks: the lease object."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from pipelines.engine import lease as lease_module
from pipelines.engine.lease import LEASE
from pipelines.engine.rundir import RunDir, RunDirInUse


def _rundir() -> RunDir:
    return RunDir(f"memory://vlmc-{uuid.uuid4().hex}/run")


def _plant(rundir: RunDir, **fields) -> None:
    held = {"owner": "someone", "pid": 1, "host": "elsewhere", "renewed_at": time.time(), **fields}
    rundir.write_bytes(rundir.path(LEASE), json.dumps(held).encode())


def test_a_held_lease_refuses_a_second_run_and_is_gone_after_the_first():
    rundir = _rundir()
    with rundir.lock():
        held = json.loads(rundir.read_bytes(rundir.path(LEASE)))
        assert held["host"] == socket.gethostname() and held["pid"] > 0
        with pytest.raises(RunDirInUse, match=f"in use by pid {held['pid']} on {held['host']}"):
            with RunDir(rundir.uri).lock():
                pass
    assert not rundir.exists(rundir.path(LEASE))
    with rundir.lock():  # free again
        pass


def test_a_lease_of_another_machine_holds_until_it_lapses():
    rundir = _rundir()
    _plant(rundir)
    with pytest.raises(RunDirInUse, match="in use by pid 1 on elsewhere.*lapses 120 s after its last renewal"):
        with rundir.lock():
            pass
    _plant(rundir, renewed_at=time.time() - 3600)
    with rundir.lock():  # lapsed: taken over
        assert json.loads(rundir.read_bytes(rundir.path(LEASE)))["host"] == socket.gethostname()


def test_a_lease_of_a_process_of_this_machine_that_is_gone_is_taken_over_at_once():
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    rundir = _rundir()
    _plant(rundir, host=socket.gethostname(), pid=int(gone.stdout))
    with rundir.lock():
        assert json.loads(rundir.read_bytes(rundir.path(LEASE)))["pid"] != int(gone.stdout)


def test_the_lease_is_renewed_while_the_run_lasts(monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_SECONDS", 0.05)
    rundir = _rundir()
    with rundir.lock():
        first = json.loads(rundir.read_bytes(rundir.path(LEASE)))["renewed_at"]
        time.sleep(0.3)
        assert json.loads(rundir.read_bytes(rundir.path(LEASE)))["renewed_at"] > first
