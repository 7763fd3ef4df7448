"""The driver: manifest, resume, refusal of a changed config, ledger failures, temporaries."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.demo.pool import write_demo_pool
from pipelines.engine.config import parse_config
from pipelines.engine.execute import ConfigChangedError, run_pipeline
from pipelines.engine.ledger import LedgerError
from pipelines.engine.runner import LocalRunner, Runner
from pipelines.job import build_plan
from schemas.manifest import StageCounts
from tests.conftest import TEXT_ONLY_HOST, read_phase, read_rejects

STAGES = [
    {"stage": "curation.basic:JunkAltText"},
    {"stage": "curation.basic:CaptionLength"},
    {"stage": "curation.dedup:ExactDuplicates"},
]


@pytest.fixture
def config(tmp_path):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=3000, seed=1)
    return {
        "name": "run",
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 500,
        "stages": STAGES,
    }


def _run(raw, runner: Runner | None = None):
    plan = build_plan(parse_config(raw))
    return plan, run_pipeline(plan, runner or LocalRunner())


class CountingRunner(LocalRunner):
    """A LocalRunner that records which shards each phase processed."""

    def __init__(self):
        super().__init__()
        self.processed: dict[str, list[int]] = {}

    def run_phase(self, task, shards):
        self.processed.setdefault(task.name, []).extend(shards)
        return super().run_phase(task, shards)


def test_manifest_records_config_versions_phases_aggregates_and_a_closed_ledger(config):
    plan, manifest = _run(config)
    on_disk = json.loads(open(os.path.join(plan.run_uri, "manifest.json")).read())
    assert on_disk["status"] == "complete" and on_disk["config_hash"] == plan.config_hash
    assert {"python", "pyarrow", "ray", "polars"} <= set(on_disk["versions"])
    assert [p["name"] for p in on_disk["phases"]] == ["00_input", "01_caption_length", "02_exact_duplicates"]
    assert on_disk["aggregates"]["exact_duplicates"]["duplicate_rows"] > 0
    ledger = {name: StageCounts.from_dict(c) for name, c in on_disk["ledger"].items()}
    assert list(ledger) == ["read", "junk_alt_text", "caption_length", "exact_duplicates"]
    assert all(c.closes for c in ledger.values())
    # The chain: every stage received what the previous kept, and the last kept is what is on disk.
    counts = list(ledger.values())
    assert all(b.rows_in == a.rows_kept for a, b in zip(counts, counts[1:]))
    kept = read_phase(plan.run_uri, manifest.final_phase)
    assert counts[-1].rows_kept == kept.num_rows
    assert read_rejects(plan.run_uri).num_rows == sum(c.rows_rejected for c in counts)
    assert counts[0].rows_in == sum(1 for _ in open(config["input"])) - 1  # every line but the header


def test_progress_is_reported_when_each_phase_starts_and_after_each_shard(config):
    calls = []
    plan = build_plan(parse_config(config))
    manifest = run_pipeline(plan, LocalRunner(), progress=lambda *call: calls.append(call))
    shards = manifest.phases[0].shards_total
    assert calls[: shards + 2] == [("00_input", done, 0) for done in range(shards + 1)] + [("00_input", shards, shards)]
    for phase in plan.phase_names[1:]:
        assert [c for c in calls if c[0] == phase] == [(phase, done, shards) for done in range(shards + 1)]


def test_rerun_of_a_complete_run_processes_nothing(config):
    _run(config)
    runner = CountingRunner()
    _run(config, runner)
    assert all(shards == [] for shards in runner.processed.values())


def test_resume_redoes_only_unfinished_shards_and_gives_the_same_rows(config, tmp_path):
    plan, _ = _run(config)
    reference = read_phase(plan.run_uri, "02_exact_duplicates")
    phase = os.path.join(plan.run_uri, "01_caption_length")
    # Shard 3 of phase 01 was "interrupted": no ledger entry (so the phase never closed its ledger),
    # a stale temporary beside it.
    os.remove(os.path.join(phase, "_ledger", "00003.json"))
    _reopen(plan, "01_caption_length")
    stale = os.path.join(phase, ".00003.parquet.tmp-deadbeef")
    open(stale, "wb").write(b"partial")
    untouched = os.path.join(phase, "00002.parquet")
    before = os.stat(untouched).st_mtime_ns
    runner = CountingRunner()
    _run(config, runner)
    assert runner.processed["01_caption_length"] == [3]
    assert os.stat(untouched).st_mtime_ns == before
    assert not os.path.exists(stale)
    assert read_phase(plan.run_uri, "02_exact_duplicates").equals(reference)


def test_changed_config_is_refused_with_the_changed_key_and_how_to_start_anew(config):
    _run(config)
    changed = {**config, "stages": [STAGES[0], {**STAGES[1], "min_words": 4}, STAGES[2]]}
    with pytest.raises(ConfigChangedError) as error:
        _run(changed)
    message = str(error.value)
    assert "stages.01.params.min_words: 2 -> 4" in message
    assert "name=<new name>" in message


def test_runner_resources_and_location_are_not_a_config_change(config):
    _run(config)
    rerun = {**config, "runner": "ray", "stages": [STAGES[0], {**STAGES[1], "resources": {"batch_size": 7}}, STAGES[2]]}
    runner = CountingRunner()  # the local one: a runner switch must not matter to the hash
    _run(rerun, runner)
    assert all(shards == [] for shards in runner.processed.values())


def _reopen(plan, phase: str) -> None:
    """As if the run had stopped before ``phase`` closed its ledger: its shards' own entries count."""
    os.remove(os.path.join(plan.run_uri, phase, "_ledger.json"))


def test_a_ledger_entry_that_does_not_close_fails_the_run(config):
    plan, _ = _run(config)
    _reopen(plan, "01_caption_length")
    path = os.path.join(plan.run_uri, "01_caption_length", "_ledger", "00001.json")
    entry = json.loads(open(path).read())
    counts = entry["stages"]["caption_length"]
    counts["rows_kept"] -= 1  # a row neither kept nor rejected
    entry["rows_out"] -= 1
    open(path, "w").write(json.dumps(entry))
    rejected = sum(counts["rejected"].values())
    with pytest.raises(LedgerError) as error:
        _run(config)
    assert str(error.value) == (
        f"phase '01_caption_length', shard 1, stage 'caption_length': {counts['rows_in']} "
        f"rows in but {counts['rows_kept']} kept + {rejected} rejected"
    )
    assert json.loads(open(os.path.join(plan.run_uri, "manifest.json")).read())["status"] == "failed"


def test_rows_rejected_for_an_internal_error_are_reported(config, caplog):
    config["stages"] = STAGES + [{"stage": "tests.stages:InternalErrorOnIndex", "source_index": 1234}]
    plan, manifest = _run(config)
    assert manifest.stage_totals()["internal_error_on_index"].rejected == {"internal_error": 1}
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == (
        "stage 'internal_error_on_index' rejected 1 row(s) with internal_error: an error in vlmcurate "
        f"or a library, not in the data; the exceptions are in {plan.run_uri}/rejects/"
        "02_internal_error_on_index/ (column detail)"
    )


def test_a_shard_reading_rows_the_previous_phase_never_wrote_fails_the_run(config):
    plan, _ = _run(config)
    _reopen(plan, "01_caption_length")
    path = os.path.join(plan.run_uri, "01_caption_length", "_ledger", "00001.json")
    entry = json.loads(open(path).read())
    entry["rows_in"] += 1  # claims a row the input phase never wrote
    entry["stages"]["junk_alt_text"]["rows_in"] += 1
    entry["stages"]["junk_alt_text"]["rows_kept"] += 1
    entry["stages"]["caption_length"]["rows_in"] += 1
    entry["stages"]["caption_length"]["rows_kept"] += 1
    entry["rows_out"] += 1
    open(path, "w").write(json.dumps(entry))
    with pytest.raises(LedgerError, match="shard 1: read .* rows, but the previous phase '00_input' wrote"):
        _run(config)
    assert json.loads(open(os.path.join(plan.run_uri, "manifest.json")).read())["status"] == "failed"


def test_a_changed_input_under_a_run_is_detected(config, tmp_path):
    plan, _ = _run(config)
    with open(config["input"], "a") as f:
        f.write("https://demo.invalid/late.jpg,a late addition to the pool\n")
    with pytest.raises(ConfigChangedError, match="input.files"):
        _run(config)


def test_a_run_made_under_another_uid_scheme_is_not_resumed(config):
    plan, _ = _run(config)
    path = os.path.join(plan.run_uri, "manifest.json")
    manifest = json.loads(open(path).read())
    manifest["config_hash"] = "made-by-an-older-version"
    del manifest["config"]["fingerprint"]["input"]["uid_scheme"]  # as runs made before the scheme was recorded
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(ConfigChangedError, match="input.uid_scheme"):
        _run(config)


def test_global_aggregate_is_saved_and_reused_on_resume(config):
    plan, _ = _run(config)
    path = os.path.join(plan.run_uri, "aggregates", "exact_duplicates.pkl")
    assert os.path.exists(path)
    os.remove(os.path.join(plan.run_uri, "02_exact_duplicates", "_ledger", "00000.json"))
    _reopen(plan, "02_exact_duplicates")
    runner = CountingRunner()
    computed = []
    runner.reduce_by_key = lambda *args: computed.append(args) or []
    _run(config, runner)
    assert computed == []  # the saved decision was used, not recomputed
    assert runner.processed["02_exact_duplicates"] == [0]


class DroppingRunner(LocalRunner):
    """Loses one shard's result, as a worker writing to its own local disk would."""

    def run_phase(self, task, shards):
        return super().run_phase(task, [s for s in shards if s != 2])


def test_a_phase_missing_a_shard_fails_the_run(config):
    with pytest.raises(LedgerError, match=r"finished without shard\(s\) \[2\]"):
        _run(config, DroppingRunner())


def test_a_run_stopped_before_any_shard_takes_a_corrected_config(config, tmp_path):
    bad = {**config, "columns": {"caption": "capton"}}
    with pytest.raises(ValueError, match="columns.caption: column 'capton'"):
        _run(bad)
    _, manifest = _run(config)  # not refused: nothing was written under the bad config
    assert manifest.status == "complete"


def test_a_second_process_on_the_same_run_directory_is_refused(config):
    from pipelines.engine.rundir import RunDir, RunDirInUse

    plan = build_plan(parse_config(config))
    with RunDir(plan.run_uri).lock():
        with pytest.raises(RunDirInUse, match="in use by another process"):
            run_pipeline(plan, LocalRunner())


def test_resume_is_recorded_in_the_manifest_history(config):
    _run(config)
    _, manifest = _run(config)
    assert len(manifest.history) == 1 and "resumed_at" in manifest.history[0]


def test_a_closed_phase_is_read_from_its_one_ledger_file(config, monkeypatch):
    from pipelines.engine.rundir import PHASE_LEDGER, RunDir

    plan, manifest = _run(config)
    rundir = RunDir(plan.run_uri)
    for phase in plan.phase_names:
        assert rundir.exists(rundir.path(phase, PHASE_LEDGER))
    expected = rundir.shard_entries("01_caption_length")
    reads = []
    read_bytes = RunDir.read_bytes
    monkeypatch.setattr(RunDir, "read_bytes", lambda self, path: reads.append(path) or read_bytes(self, path))
    assert rundir.shard_entries("01_caption_length") == expected and len(expected) == 7
    assert reads == [rundir.path("01_caption_length", PHASE_LEDGER)]  # one read, not one per shard
