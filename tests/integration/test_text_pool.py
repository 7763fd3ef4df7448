"""The issue's acceptance run: configs/text-pool.yaml on real LAION-style alt-text, both runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, read_phase, read_rejects, shared_path

VLMCURATE = str(Path(sys.executable).parent / "vlmcurate")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VLMCURATE, "run", "configs/text-pool.yaml", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )


def test_text_pool_gives_identical_rows_under_local_and_ray_and_its_ledger_closes(tmp_path):
    pool = shared_path("alttext", "laion_style_10000.parquet")
    results = {}
    for runner in ("local", "ray"):
        out = tmp_path / runner
        done = _run_cli(f"input={pool}", f"output_dir={out}", f"runner={runner}", "ray.num_cpus=2")
        assert done.returncode == 0, done.stdout + done.stderr
        run_dir = out / "text-pool"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        ledger = manifest["ledger"]
        for name, c in ledger.items():
            assert c["rows_in"] == c["rows_kept"] + sum(c["rejected"].values()), name
        assert ledger["read"]["rows_in"] == 10_000
        kept = read_phase(run_dir, manifest["phases"][-1]["name"])
        rejects = read_rejects(run_dir)
        assert kept.num_rows + rejects.num_rows == 10_000
        assert len(set(kept["uid"].to_pylist())) == kept.num_rows
        results[runner] = (kept, rejects, ledger)
    assert results["local"][0].equals(results["ray"][0])
    assert results["local"][1].equals(results["ray"][1])
    assert results["local"][2] == results["ray"][2]
    assert os.listdir(tmp_path / "ray" / "text-pool" / "rejects")  # rejects were written
