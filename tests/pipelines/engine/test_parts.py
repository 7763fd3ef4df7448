"""The engine runs what it is handed: a source other than the pool reader, finishers in their order."""

from __future__ import annotations

import logging
from collections import namedtuple

import pyarrow as pa
import pytest

from pipelines.engine.config import parse_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.parts import FinishedRun, InputShard
from pipelines.engine.plan import make_plan
from pipelines.engine.rundir import PHASE_LEDGER, RunDir
from pipelines.engine.runner import LocalRunner
from schemas.columns import CAPTION, SOURCE_INDEX, UID, URL
from schemas.manifest import StageCounts


class ListSource:
    """Rows held in memory, two shards of them."""

    stage_name = "listed"
    kept_columns = ()
    unique_column = None

    def __init__(self, captions: list[str]) -> None:
        self.captions = captions

    def fingerprint(self):
        return {"captions": self.captions}

    def plan_reads(self, shard_size):
        return None  # read in order, by the driver

    def read_shards(self, shard_size):
        for shard, start in enumerate(range(0, len(self.captions), shard_size)):
            part = self.captions[start : start + shard_size]
            rows = pa.table(
                {
                    UID: [f"u{start + i}" for i in range(len(part))],
                    SOURCE_INDEX: pa.array(range(start, start + len(part)), pa.int64()),
                    URL: [f"http://127.0.0.1/{start + i}.jpg" for i in range(len(part))],
                    CAPTION: part,
                }
            )
            yield InputShard(shard, rows, None, StageCounts(len(part), len(part), {}))


class Recorder:
    """A finisher that notes what it saw; ``fail`` makes it raise."""

    def __init__(self, name, required, calls, fail=False, needs=()):
        self.name, self.required, self.calls, self.fail, self.needs = name, required, calls, fail, needs
        self.redo_hint = "run it again"

    def check(self, columns):
        missing = [c for c in self.needs if c not in columns]
        if missing:
            raise ValueError(f"{self.name} needs {missing}")

    def outputs(self):
        return [self.name]

    def finish(self, run: FinishedRun):
        manifest_status = RunDir(run.plan.run_uri).read_manifest().status
        self.calls.append((self.name, manifest_status, run.phase, sum(e.rows_out for e in run.entries.values())))
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        return True


def _plan(tmp_path, finishers):
    config = parse_config(
        {
            "name": "parts",
            "input": str(tmp_path / "unused.csv"),
            "output_dir": str(tmp_path / "runs"),
            "shard_size": 3,
            "stages": [{"stage": "curation.basic:CaptionLength", "min_words": 2}],
        }
    )
    return make_plan(config, ListSource(["a dog", "x", "a red car", "two cats", "y"]), finishers)


def test_the_source_named_in_the_ledger_and_finishers_run_before_and_after_completion(tmp_path):
    calls = []
    plan = _plan(tmp_path, (Recorder("card", False, calls), Recorder("export", True, calls)))
    manifest = run_pipeline(plan, LocalRunner())
    assert manifest.phases[0].counts["listed"].rows_in == 5
    assert manifest.phases[-1].rows_out == 3
    final = plan.phase_names[-1]
    assert calls == [("export", "running", final, 3), ("card", "complete", final, 3)]


def test_a_failing_optional_finisher_is_logged_and_the_run_stays_complete(tmp_path, caplog):
    calls = []
    plan = _plan(tmp_path, (Recorder("card", False, calls, fail=True),))
    with caplog.at_level(logging.ERROR):
        manifest = run_pipeline(plan, LocalRunner())
    assert manifest.status == "complete"
    assert "could not write the card" in caplog.text and "run it again" in caplog.text


def test_a_failing_required_finisher_fails_the_run(tmp_path):
    plan = _plan(tmp_path, (Recorder("export", True, [], fail=True),))
    with pytest.raises(RuntimeError, match="export broke"):
        run_pipeline(plan, LocalRunner())
    assert RunDir(plan.run_uri).read_manifest().status == "failed"


def test_a_finisher_refuses_the_plan_when_the_final_rows_lack_its_column(tmp_path):
    with pytest.raises(ValueError, match=r"export needs \['image'\]"):
        _plan(tmp_path, (Recorder("export", True, [], needs=("image",)),))


def test_a_stage_may_not_take_the_sources_ledger_name(tmp_path):
    config = parse_config(
        {
            "name": "parts",
            "input": str(tmp_path / "unused.csv"),
            "output_dir": str(tmp_path / "runs"),
            "stages": [{"stage": "curation.basic:CaptionLength", "name": "listed"}],
        }
    )
    with pytest.raises(ValueError, match="stage name 'listed' is taken"):
        make_plan(config, ListSource(["a b"]))


Read = namedtuple("Read", "shard start")


class PlannedListSource(ListSource):
    """The same rows, planned as one read per shard that a worker does alone."""

    def plan_reads(self, shard_size):
        return [Read(shard, start) for shard, start in enumerate(range(0, len(self.captions), shard_size))]

    def read(self, planned):
        return next(s for s in self.read_shards(3) if s.shard == planned.shard)


def test_a_source_that_plans_its_reads_has_the_runner_read_them_and_resumes_the_rest(tmp_path):
    config = _plan(tmp_path, ()).config
    reads = []

    class Counting(LocalRunner):
        def map_tasks(self, fn, first, items):
            reads.extend(items)
            return super().map_tasks(fn, first, items)

    plan = make_plan(config, PlannedListSource(["a dog", "x", "a red car", "two cats", "y"]))
    seen = []
    manifest = run_pipeline(plan, Counting(), lambda phase, done, total: seen.append((phase, done, total)))
    assert reads == [Read(0, 0), Read(1, 3)] and manifest.phases[0].counts["listed"].rows_in == 5
    assert [s for s in seen if s[0] == "00_input"][-3:] == [("00_input", 1, 2), ("00_input", 2, 2), ("00_input", 2, 2)]
    rundir = RunDir(plan.run_uri)
    rundir.remove(f"00_input/{PHASE_LEDGER}")
    rundir.remove("00_input/_ledger/00001.json")
    rundir.remove("manifest.json")  # as if stopped while the input was read
    reads.clear()
    run_pipeline(plan, Counting())
    assert reads == [Read(1, 3)]  # only the shard that was not written
