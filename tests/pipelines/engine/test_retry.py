"""retry-failed: transient rejects re-attempted and merged, the rest untouched, the run rebuilt."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from pipelines.cli.main import app
from pipelines.engine.config import parse_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.retry import retry_failed
from pipelines.engine.runner import LocalRunner
from pipelines.job import build_plan
from tests.conftest import read_phase, read_rejects
from tests.http_server import ImageServer, make_image


@pytest.fixture
def server():
    server = ImageServer()
    for i in range(12):
        server.add(f"{i}.jpg", make_image(96, 72, seed=i))
    yield server
    server.close()


def _config(tmp_path, server, name="retry"):
    pool = tmp_path / "pool.csv"
    with open(pool, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(12):
            # 4 flaky urls fail 3 times: twice in the run (retries=1), then once more and succeed.
            path = f"/flaky/3/{i}.jpg" if i % 3 == 0 else (f"/status/404?{i}" if i % 3 == 1 else f"/img/{i}.jpg")
            writer.writerow([server.url(path), f"picture number {i} of a test"])
    return {
        "name": name,
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 4,
        "stages": [
            {
                "stage": "pipelines.download:Download",
                "allow_addresses": ["127.0.0.1"],
                "retries": 1,
                "backoff": 0.01,
                "timeout": 2,
                "threads": 4,
                "image_size": 64,
            },
            {"stage": "curation.basic:ImageSize", "min_side": 16},
            {"stage": "curation.dedup:ExactDuplicates", "name": "image_duplicates", "keys": ["sha256"]},
        ],
        "export": {"formats": ["webdataset"], "samples_per_shard": 5},
    }


def test_transient_rejects_are_retried_and_merged_with_a_closed_ledger(tmp_path, server):
    plan = build_plan(parse_config(_config(tmp_path, server)))
    first = run_pipeline(plan, LocalRunner())
    assert first.stage_totals()["download"].rejected == {"http_500": 4, "http_404": 4}
    assert first.phases[-1].rows_out == 4

    report, manifest = retry_failed(plan, LocalRunner())
    assert report.phase == "01_download" and report.attempted == {"http_500": 4} and report.recovered == 4
    totals = manifest.stage_totals()
    assert totals["download"].rejected == {"http_404": 4} and totals["download"].rows_kept == 8
    assert all(c.closes for c in totals.values()) and manifest.status == "complete"
    kept = read_phase(plan.run_uri, manifest.final_phase)
    assert kept.num_rows == 8 and len(set(kept["uid"].to_pylist())) == 8
    assert sorted(read_rejects(plan.run_uri)["reason"].to_pylist()) == ["http_404"] * 4
    # 404s are not transient: never asked for again.
    assert all(server.requests[f"/status/404?{i}"] == 1 for i in range(1, 12, 3))
    sizes = json.loads((tmp_path / "runs" / "retry" / "export" / "webdataset" / "sizes.json").read_text())
    assert sum(sizes.values()) == 8 and manifest.export["rows"] == 8
    assert [h["retried_phase"] for h in manifest.history if "retried_phase" in h] == ["01_download"]


def test_nothing_to_retry_leaves_the_run_as_it_was(tmp_path, server):
    config = _config(tmp_path, server, name="clean")
    config["stages"][0]["retries"] = 3  # the flaky urls recover within the run itself
    plan = build_plan(parse_config(config))
    run_pipeline(plan, LocalRunner())
    before = read_phase(plan.run_uri, "03_image_duplicates")
    report, manifest = retry_failed(plan, LocalRunner())
    assert report.phase is None and not report.attempted
    assert read_phase(plan.run_uri, "03_image_duplicates").equals(before)


def test_the_command_line(tmp_path, server):
    plan = build_plan(parse_config(_config(tmp_path, server, name="cli")))
    run_pipeline(plan, LocalRunner())
    result = CliRunner().invoke(app, ["retry-failed", plan.run_uri, "--runner", "local"])
    assert result.exit_code == 0, result.output
    assert "retried 4 rows of 01_download (http_500 4): 4 recovered" in result.output


def test_a_retry_killed_mid_way_can_simply_be_run_again(tmp_path, server, monkeypatch):
    from pipelines.engine.rundir import RunDir

    plan = build_plan(parse_config(_config(tmp_path, server, name="killed")))
    run_pipeline(plan, LocalRunner())
    original, writes = RunDir.write_table, []

    def killed_on_the_second_shard(self, path, table):
        if "/rejects/01_download/" in path:
            writes.append(path)
            if len(writes) == 2:  # shard rows rewritten, its ledger entry gone, its rejects not yet
                raise KeyboardInterrupt("killed")
        return original(self, path, table)

    monkeypatch.setattr(RunDir, "write_table", killed_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        retry_failed(plan, LocalRunner())
    monkeypatch.undo()

    _, manifest = retry_failed(plan, LocalRunner())  # finishes the retry; the resume redoes the broken shard
    totals = manifest.stage_totals()
    assert manifest.status == "complete" and all(c.closes for c in totals.values())
    assert totals["download"].rejected == {"http_404": 4}
    kept = read_phase(plan.run_uri, manifest.final_phase)
    assert kept.num_rows == 8 and len(set(kept["uid"].to_pylist())) == 8
    assert sorted(read_rejects(plan.run_uri)["reason"].to_pylist()) == ["http_404"] * 4
