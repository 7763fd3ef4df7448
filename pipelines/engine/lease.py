"""One run at a time on a run directory that has no file locks (an object store): a lease object.

The holder writes ``.lease`` (who, where, when) and renews it every :data:`RENEW_SECONDS` while it
runs; another process finds it held while it was renewed within :data:`LAPSE_SECONDS`, unless it
names a process of this machine that no longer exists (a run killed here may resume at once).
Object stores give no compare-and-swap through pyarrow, so two processes starting within the same
second could both write it: each reads the lease back after writing, and the one that finds the
other's name stops. A lease that lapsed (its holder was killed on another machine) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

LEASE = ".lease"
RENEW_SECONDS = 30.0
LAPSE_SECONDS = 120.0


class LeaseHeld(RuntimeError):
    """Another process holds the run directory's lease."""


@contextlib.contextmanager
def lease(rundir: Any) -> Iterator[None]:
    """Hold ``rundir``'s lease while the block runs (``rundir``: a :class:`~pipelines.engine.rundir.RunDir`)."""
    path = rundir.path(LEASE)
    mine = {"owner": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname()}
    held = _read(rundir, path)
    if held is not None and _alive(held):
        raise LeaseHeld(_message(rundir, held))
    _write(rundir, path, mine)
    read_back = _read(rundir, path)
    if read_back is None or read_back.get("owner") != mine["owner"]:
        raise LeaseHeld(_message(rundir, read_back or held or {}))
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(rundir, path, mine, stop), name="vlmcurate-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(OSError):
            if (_read(rundir, path) or {}).get("owner") == mine["owner"]:
                rundir.fs.delete_file(path)


def _renew(rundir: Any, path: str, mine: dict, stop: threading.Event) -> None:
    while not stop.wait(RENEW_SECONDS):
        with contextlib.suppress(OSError):  # a missed renewal only shortens the lease
            _write(rundir, path, mine)


def _write(rundir: Any, path: str, mine: dict) -> None:
    rundir.write_bytes(path, json.dumps({**mine, "renewed_at": time.time()}).encode())


def _read(rundir: Any, path: str) -> dict | None:
    try:
        return json.loads(rundir.read_bytes(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError:
        return None if not rundir.exists(path) else {}


def _alive(held: dict) -> bool:
    """Whether the lease's holder may still run: renewed lately, and not a dead process of this machine."""
    if time.time() - float(held.get("renewed_at", 0)) > LAPSE_SECONDS:
        return False
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _message(rundir: Any, held: dict) -> str:
    age = time.time() - float(held.get("renewed_at", time.time()))
    return (
        f"run directory {rundir.uri} is in use by pid {held.get('pid', '?')} on {held.get('host', '?')} "
        f"(its lease was renewed {age:.0f} s ago). If that run is gone, its lease lapses "
        f"{LAPSE_SECONDS:.0f} s after its last renewal; or delete {rundir.uri_of(rundir.path(LEASE))}"
    )
