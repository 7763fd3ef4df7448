"""`vlmcurate demo` end to end on a fresh output folder, as `make demo` runs it, at a small scale.

The same chain as `make demo` (pool, LiT heads, curation on Ray, VLM stages 1 and 2, evaluation)
with a smaller pool and a few steps per model, so the suite stays fast; the full-size demo is
timed in README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, free_port

SMALL = ["bootstrap_scenes=96", "clip.batch_size=32", "clip.max_steps=20", "clip.save_every=20",
         "vlm_stage1.max_steps=2", "vlm_stage1.batch_size=2", "vlm_stage2.max_steps=2", "vlm_stage2.batch_size=1",
         "eval.heldout_images=3"]


def test_demo_runs_the_whole_chain_on_ray(tmp_path):
    vlmcurate = str(Path(sys.executable).parent / "vlmcurate")
    done = subprocess.run([vlmcurate, "demo", *SMALL, "--output-dir", str(tmp_path), "--port", str(free_port()),
                           "--rows", "500"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run = tmp_path / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["pipeline"]["runner"] == "ray"
    ledger = manifest["ledger"]
    assert all(c["rows_in"] == c["rows_kept"] + sum(c["rejected"].values()) for c in ledger.values())
    rejected = {reason for c in ledger.values() for reason in c["rejected"]}
    assert {"malformed_row", "filename_caption", "duplicate", "too_long", "http_404", "not_an_image", "opt_out",
            "too_small", "clip_score_below_top_fraction"} <= rejected
    stages = list(ledger)
    for stage in ("metaclip_balance", "clip_embed", "image_near_duplicates", "blip_caption", "capfilt_select",
                  "instruct", "brief_descriptions"):
        assert stage in stages, stages
    export = run / "export"
    sizes = json.loads((export / "webdataset" / "sizes.json").read_text())
    assert sum(sizes.values()) == manifest["phases"][-1]["rows_out"] == manifest["export"]["rows"]
    counts = json.loads((export / "llava" / "counts.json").read_text())
    assert json.loads((export / "llava" / "stage2.json").read_text()) and counts
    for stage in ("demo-vlm-stage1", "demo-vlm-stage2"):
        assert list((tmp_path / stage / "checkpoints").glob("step-*.pt")), stage
    assert (tmp_path / "lit-clip" / "checkpoints").is_dir()
    evaluation = json.loads((tmp_path / "demo-eval.json").read_text())
    assert evaluation["captions"]["images"] == 3 and "cider_d" in evaluation["captions"]
    assert {"random", "popular", "adversarial"} <= set(evaluation["probe"])
    card = (run / "README.md").read_text()
    assert "## Funnel" in card and (run / "card").is_dir()
    assert "where everything went" in done.stdout and "demo-eval.json" in done.stdout


def test_a_bad_model_override_fails_before_anything_runs(tmp_path):
    vlmcurate = str(Path(sys.executable).parent / "vlmcurate")
    done = subprocess.run([vlmcurate, "demo", "vlm_stage1.max_stepz=3", "--output-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "max_stepz" in done.stdout + done.stderr
    assert not any(tmp_path.iterdir())
