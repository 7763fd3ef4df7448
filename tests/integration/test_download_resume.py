"""Kill a Ray download run with SIGKILL; the rerun must not fetch finished shards again."""

from __future__ import annotations

import subprocess

import pyarrow.parquet as pq
import yaml

from pipelines.engine.config import parse_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.runner import LocalRunner
from pipelines.job import build_plan
from tests.conftest import REPO_ROOT, read_phase
from tests.http_server import ImageServer, make_image
from tests.integration.killing import kill_after, run_command

SHARDS, ROWS = 16, 20


def test_a_killed_download_resumes_without_fetching_finished_shards_again(tmp_path):
    server = ImageServer()
    for i in range(8):
        server.add(f"{i}.jpg", make_image(64, 48, seed=i))
    pool = tmp_path / "pool.csv"
    paths = [f"/delay/60/{i % 8}.jpg?row={i}" for i in range(SHARDS * ROWS)]
    pool.write_text("url,caption\n" + "".join(f"{server.url(p)},picture {i} of a test\n" for i, p in enumerate(paths)))
    config = {
        "name": "dl",
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "runner": "ray",
        "shard_size": ROWS,
        "stages": [
            {"stage": "pipelines.download:Download", "allow_addresses": ["127.0.0.1"], "threads": 4, "image_size": 32}
        ],
    }
    config_path = tmp_path / "dl.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = run_command(config_path)
    run_dir = tmp_path / "runs" / "dl"
    done = kill_after(command, run_dir, "01_download", 3, tmp_path / "first.log")
    finished = sorted(int(name.split(".")[0]) for name in done)
    assert 3 <= len(finished) < SHARDS
    for path in run_dir.rglob("*.parquet"):  # nothing partial is visible
        pq.read_table(path)

    resumed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for shard in finished:  # fetched once, before the kill, never again
        for path in paths[shard * ROWS : (shard + 1) * ROWS]:
            assert server.requests[path] == 1, path
    rows = read_phase(run_dir, "01_download")
    assert rows.num_rows == SHARDS * ROWS and len(set(rows["uid"].to_pylist())) == rows.num_rows

    reference = build_plan(parse_config({**config, "name": "reference", "runner": "local"}))
    run_pipeline(reference, LocalRunner())
    expected = read_phase(reference.run_uri, "01_download")
    assert rows.select(["uid", "url", "sha256", "width"]).equals(expected.select(["uid", "url", "sha256", "width"]))
    server.close()
