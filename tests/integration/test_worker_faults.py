"""Faults end to end: SIGKILL single Ray workers of a demo-sized run while it goes on.

One worker dies mid-batch in the CLIP stage (its actor), one in the instruction stage (its actor,
with requests in flight to a loopback OpenAI-compatible server) and one while writing a shard.
The same run, not a rerun, must complete on its own (Ray restarts the actors and runs the lost
batches again) and keep exactly a clean run's rows: the ledger closes and no uid appears twice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipelines.demo.pool import write_demo_pool
from pipelines.demo.server import DemoImageServer
from pipelines.engine.runner import LocalRunner
from tests.conftest import read_phase, read_rejects, run_pipeline_dict
from tests.integration.killing import WorkerKiller, running_title
from tests.openai_server import FakeChatServer

ROWS = 1200
SHARD_SIZE = 150  # 8 shards: the kills land on early batches, later ones show the replacements at work
KEY_ENV = "VLMCURATE_TEST_KEY"
#: Killed in this order, each the first time a worker is seen running it.
TARGETS = [running_title("clip_embed"), running_title("instruct"), "ray::MapBatches(finish_shards)"]


def _config(tmp_path, pool, name: str, chat: FakeChatServer) -> dict:
    return {
        "name": name,
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "runner": "ray",
        "shard_size": SHARD_SIZE,
        "stages": [
            {"stage": "curation.basic:CaptionCharacters"},
            {"stage": "curation.basic:JunkAltText"},
            {"stage": "curation.basic:CaptionLength"},
            {
                "stage": "pipelines.download:Download",
                "allow_addresses": ["127.0.0.1"],
                "image_size": 64,
                "threads": 16,
                "timeout": 5,
            },
            {"stage": "curation.basic:ImageSize"},
            {"stage": "curation.clip_score:ClipPreprocess", "model": "tiny-vit"},
            # One torch thread under both runners, so the scores are bit-identical.
            {"stage": "curation.clip_score:ClipEmbed", "model": "tiny-vit", "resources": {"gpus": 0, "cpus": 1}},
            {"stage": "curation.clip_score:ClipScoreThreshold", "min_score": -0.07},
            {
                "stage": "generators.instruct:InstructGenerate",
                "backend": "openai",
                "response_types": ["conversation"],
                "cache": str(tmp_path / f"{name}-cache.sqlite"),
                "endpoint": {
                    "model": "test-model",
                    "base_url": chat.base_url,
                    "api_key_env": KEY_ENV,
                    "concurrency": 8,
                    "timeout": 5.0,
                    "backoff_base": 0.05,
                },
            },
        ],
    }


def _manifest(run_uri: str) -> dict:
    return json.loads((Path(run_uri) / "manifest.json").read_text())


def test_killed_workers_are_replaced_and_the_run_keeps_exactly_a_clean_runs_rows(tmp_path, monkeypatch, runner_factory):
    monkeypatch.setenv(KEY_ENV, "test-key")
    images = DemoImageServer(0)
    try:
        pool = tmp_path / "pool.csv"
        write_demo_pool(str(pool), images.base, rows=ROWS, seed=11)
        # A delay per reply keeps an instruct batch in flight long enough to be caught.
        with FakeChatServer(latency=0.02) as chat:
            runner = runner_factory("ray")  # this process's Ray: the killer looks only below this process
            with WorkerKiller(TARGETS) as killer:
                plan, manifest = run_pipeline_dict(_config(tmp_path, pool, "faults", chat), runner)
            clean_plan, clean = run_pipeline_dict(
                {**_config(tmp_path, pool, "clean", chat), "runner": "local"}, LocalRunner()
            )
    finally:
        images.close()

    # Every kill landed on a worker running its target, and another worker did that work afterwards.
    assert list(killer.killed) == TARGETS, killer.killed
    assert all(killer.after.values()), f"no worker took over from a killed one: {killer.after}"

    # The same run completed, its ledger closes stage by stage, and it is the clean run's ledger.
    written = _manifest(plan.run_uri)
    assert manifest.status == written["status"] == "complete"
    ledger = written["ledger"]
    for stage, counts in ledger.items():
        assert counts["rows_in"] == counts["rows_kept"] + sum(counts["rejected"].values()), stage
    assert ledger["clip_embed"]["rows_in"] > 0.6 * ROWS and ledger["instruct"]["rows_in"] > 0.25 * ROWS  # demo-sized
    assert ledger == _manifest(clean_plan.run_uri)["ledger"]
    assert not [p for p in Path(plan.run_uri).rglob("*") if ".tmp-" in p.name]

    # No duplicates: every input row ends in exactly one place, kept or rejected once.
    kept, rejects = read_phase(plan.run_uri, manifest.final_phase), read_rejects(plan.run_uri)
    kept_uids, reject_uids = kept["uid"].to_pylist(), rejects["uid"].to_pylist()
    assert not [uid for uid, n in Counter(kept_uids + reject_uids).items() if n > 1]
    assert len(kept_uids) + len(reject_uids) == ledger["read"]["rows_in"]

    # The kept rows, and every reject, are exactly the clean run's.
    clean_kept = read_phase(clean_plan.run_uri, clean.final_phase)
    assert kept_uids == clean_kept["uid"].to_pylist()
    assert kept.equals(clean_kept)
    assert rejects.equals(read_rejects(clean_plan.run_uri))
