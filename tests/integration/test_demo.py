"""`vlmcurate demo` end to end on a fresh output folder, as `make demo` runs it, at a small scale.

The same chain as `make demo` (pool, LiT heads, curation on Ray, VLM stages 1 and 2, evaluation)
with a smaller pool and a few steps per model, so the suite stays fast; the full-size demo is
timed in README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_demo


def test_demo_runs_the_whole_chain_on_ray(demo_run):
    folder = demo_run.folder
    run = folder / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["pipeline"]["runner"] == "ray"
    ledger = manifest["ledger"]
    assert all(c["rows_in"] == c["rows_kept"] + sum(c["rejected"].values()) for c in ledger.values())
    rejected = {reason for c in ledger.values() for reason in c["rejected"]}
    assert {
        "malformed_row",
        "filename_caption",
        "duplicate",
        "too_long",
        "http_404",
        "not_an_image",
        "opt_out",
        "too_small",
        "clip_score_below_top_fraction",
    } <= rejected
    stages = list(ledger)
    for stage in (
        "metaclip_balance",
        "clip_embed",
        "image_near_duplicates",
        "blip_caption",
        "capfilt_select",
        "absent_objects",
        "instruct",
        "brief_descriptions",
    ):
        assert stage in stages, stages
    export = run / "export"
    sizes = json.loads((export / "webdataset" / "sizes.json").read_text())
    assert sum(sizes.values()) == manifest["phases"][-1]["rows_out"] == manifest["export"]["rows"]
    counts = json.loads((export / "llava" / "counts.json").read_text())
    assert json.loads((export / "llava" / "stage2.json").read_text()) and counts
    for stage in ("demo-vlm-stage1", "demo-vlm-stage2"):
        assert list((folder / stage / "checkpoints").glob("step-*.pt")), stage
    assert (folder / "lit-clip" / "checkpoints").is_dir()
    evaluation = json.loads((folder / "demo-eval.json").read_text())
    assert evaluation["captions"]["images"] == 3 and "cider_d" in evaluation["captions"]
    assert {"random", "popular", "adversarial"} <= set(evaluation["probe"])
    card = (run / "README.md").read_text()
    assert "## Funnel" in card and (run / "card").is_dir()
    assert "where everything went" in demo_run.stdout and "demo-eval.json" in demo_run.stdout


def test_the_terminal_shows_the_steps_and_bars_and_the_log_file_the_rest(demo_run):
    out, log = demo_run.stdout, demo_run.folder / "demo.log"
    assert out.startswith(f"logs: {log}\n") and demo_run.stderr == ""
    for step in (
        "1. MetaCLIP metadata",
        "3. LiT CLIP heads",
        "4. curation (configs/demo.yaml)",
        "5. VLM stage 1",
        "time per step",
        "done in",
    ):
        assert step in out, step
    for bar in ("train lit-clip", "train demo-vlm-stage1", "train demo-vlm-stage2", "06_clip_score_top_fraction"):
        assert bar in out, bar  # a bar per training run and per phase
    assert "ledger of run demo (complete)" in out
    # No per-step log line, nothing of Ray's: all of it is in the log file.
    for mark in (
        "step 1/20 epoch",
        "vlmcurate.train",
        "INFO",
        "WARNING",
        "core_worker.cc",
        "(MapWorker",
        "streaming_executor",
        "memory per worker",
        "(raylet)",
    ):
        assert mark not in out, mark
    written = log.read_text()
    for line in ("step 20/20 epoch", "streaming_executor.py"):
        assert line in written, line


def test_a_bad_model_override_fails_before_anything_runs(tmp_path):
    done = run_demo(tmp_path, "vlm_stage1.max_stepz=3", timeout=120)
    assert done.returncode != 0 and "max_stepz" in done.stdout + done.stderr
    assert not any(tmp_path.iterdir())


def test_a_second_demo_on_the_same_folder_recomputes_nothing(demo_run):
    """Last in this module: it runs the demo again on the suite's demo folder."""
    folder = demo_run.folder
    produced = [p for p in folder.rglob("*") if p.is_file() and _is_a_product(p.relative_to(folder))]
    before = {p: p.stat().st_mtime_ns for p in produced}
    done = run_demo(folder, "--rows", "500", port=demo_run.port)  # the same pool: not a config change
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in produced} == before
    assert f"kept {folder / 'demo-metadata.json'}" in done.stdout and "kept " + str(folder / "lit-clip") in done.stdout
    manifest = json.loads((folder / "demo" / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def _is_a_product(relative: Path) -> bool:
    """What the demo computes once: the curation run's phases, rejects, export and card (not its
    manifest and lock, rewritten by every run), the metadata list and the models' checkpoints."""
    top = relative.parts[0]
    if top == "demo":
        return relative.name not in ("manifest.json", ".lock")
    return top == "demo-metadata.json" or "checkpoints" in relative.parts
