"""`vlmcurate demo` end to end on a fresh output folder, as `make demo` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, free_port


def test_demo_runs_end_to_end_on_ray(tmp_path):
    vlmcurate = str(Path(sys.executable).parent / "vlmcurate")
    done = subprocess.run([vlmcurate, "demo", "--output-dir", str(tmp_path), "--port", str(free_port())],
                          cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["pipeline"]["runner"] == "ray"
    ledger = manifest["ledger"]
    assert all(c["rows_in"] == c["rows_kept"] + sum(c["rejected"].values()) for c in ledger.values())
    rejected = {reason for c in ledger.values() for reason in c["rejected"]}
    assert {"malformed_row", "filename_caption", "duplicate", "too_long", "http_404", "not_an_image", "opt_out",
            "too_small"} <= rejected
    sizes = json.loads((tmp_path / "demo" / "export" / "webdataset" / "sizes.json").read_text())
    assert sum(sizes.values()) == manifest["phases"][-1]["rows_out"] == manifest["export"]["rows"]
    assert "kept rows:" in done.stdout
