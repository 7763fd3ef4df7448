"""``vlmcurate retry-failed``: re-attempt only the rows rejected for a transient reason.

The first phase holding rejects that its stage calls transient (``Stage.is_transient``:
timeouts, connection errors, 429 and 5xx for downloads) is retried: for each affected shard,
exactly those rows are taken again from the phase's input and run through the phase's stages;
what passes joins the shard's kept rows, what fails replaces its old reject record, and the
shard's ledger entry is recomputed (old path of those rows out, new path in), so it still
closes. Every later phase, global aggregate and the export depended on the old result: they are
removed first, and rebuilt by a normal resume of the run at the end.

Crash safety: a shard's ledger entry is removed before its files are rewritten and written back
last, so a retry killed at any moment leaves each shard either as it was, merged, or not done
(which the resume then redoes from the phase's input). Rerunning ``retry-failed`` is safe.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.engine.chain import ShardState
from pipelines.engine.execute import bind_saved_aggregate, run_pipeline
from pipelines.engine.ledger import check_shard
from pipelines.engine.phase import PhaseTask, ShardIO
from pipelines.engine.plan import Phase, Plan
from pipelines.engine.rundir import PHASE_LEDGER, REJECTS_DIR, RunDir
from pipelines.engine.runner import Runner
from schemas.columns import SOURCE_INDEX, UID
from schemas.manifest import Manifest, ShardEntry, StageCounts
from schemas.rejects import REASON, STAGE

log = logging.getLogger(__name__)


@dataclass
class RetryReport:
    """What a retry attempted and recovered, by reason."""

    phase: str | None = None
    attempted: Counter = field(default_factory=Counter)
    still_failing: Counter = field(default_factory=Counter)

    @property
    def recovered(self) -> int:
        return sum(self.attempted.values()) - sum(self.still_failing.values())


@dataclass(frozen=True)
class RetryIO(ShardIO):
    """Loads only a shard's retried rows; finishes by merging them into the written shard."""

    retry: dict[int, tuple[str, ...]] = field(default_factory=dict)
    stages: tuple[str, ...] = ()

    def load(self, shard: int) -> ShardState:
        rows = self.rundir.read_table(self.rundir.shard_path(self.input_phase, shard))
        rows = rows.filter(pc.is_in(rows[UID], value_set=pa.array(self.retry[shard], pa.string())))
        return ShardState(shard=shard, rows=rows, rows_in=rows.num_rows)

    def finish(self, state: ShardState) -> ShardEntry:
        rundir, shard = self.rundir, state.shard
        retried = pa.array(self.retry[shard], pa.string())
        old_rows = rundir.read_table(rundir.shard_path(self.name, shard))
        old_rows = old_rows.filter(pc.invert(pc.is_in(old_rows[UID], value_set=retried)))
        old_rejects = rundir.read_table(rundir.rejects_path(self.name, shard))
        is_retried = pc.is_in(old_rejects[UID], value_set=retried)
        rows = pa.concat_tables([old_rows, state.rows], promote_options="permissive").sort_by(SOURCE_INDEX)
        parts = [old_rejects.filter(pc.invert(is_retried))] + state.rejects
        rejects = (
            pa.concat_tables([p for p in parts if p.num_rows], promote_options="permissive")
            if any(p.num_rows for p in parts)
            else None
        )
        before = rundir.shard_entry(self.name, shard)
        counts = _merge_counts(before.stages, self.stages, old_rejects.filter(is_retried), state.counts)
        entry = ShardEntry(phase=self.name, shard=shard, rows_in=before.rows_in, rows_out=rows.num_rows, stages=counts)
        check_shard(entry)
        rundir.fs.delete_file(rundir.ledger_path(self.name, shard))  # "not done" until rewritten
        rundir.write_shard(entry, rows, rejects)
        return entry


def retry_failed(plan: Plan, runner: Runner) -> tuple[RetryReport, Manifest]:
    """Retry the transient rejects of the earliest phase that has some, then rebuild the run."""
    rundir = RunDir(plan.run_uri)
    report = RetryReport()
    with rundir.lock():
        manifest = rundir.read_manifest()
        if manifest is None or manifest.config_hash != plan.config_hash:
            raise ValueError(f"{plan.run_uri} holds no run of this configuration to retry")
        for index, phase in enumerate(plan.phases):
            retry = _transient_rejects(rundir, phase, report)
            if not retry:
                continue
            report.phase = phase.name
            _invalidate_after(plan, rundir, manifest, index)  # before any shard changes
            rundir.remove(f"{phase.name}/{PHASE_LEDGER}")  # its shards' entries change: closed again at the end
            manifest.history.append({"retry_started": phase.name})
            rundir.write_manifest(manifest)
            input_phase = plan.phase_names[index]  # phase_names starts with the input phase
            if phase.global_stage is not None:
                bind_saved_aggregate(phase.global_stage, rundir)
            io = RetryIO(rundir, input_phase, phase.name, retry=retry, stages=tuple(s.name for s in phase.stages))
            for entry in runner.run_phase(PhaseTask(io, phase.stages), sorted(retry)):
                log.info("retried shard %d of %s", entry.shard, phase.name)
            report.still_failing = _still_failing(rundir, phase, retry)
            manifest.history.append(
                {"retried_phase": phase.name, "attempted": dict(report.attempted), "recovered": report.recovered}
            )
            rundir.write_manifest(manifest)
            break
    return report, run_pipeline(plan, runner)


def _transient_rejects(rundir: RunDir, phase: Phase, report: RetryReport) -> dict[int, tuple[str, ...]]:
    """Transient reject uids per finished shard (a shard without a ledger entry is redone anyway)."""
    stages = {s.name: s.stage for s in phase.stages}
    finished = set(rundir.shard_entries(phase.name))
    retry: dict[int, tuple[str, ...]] = {}
    for info in rundir.list_files(f"{REJECTS_DIR}/{phase.name}"):
        if (
            info.base_name.startswith(".")
            or not info.base_name.endswith(".parquet")
            or int(info.base_name.split(".")[0]) not in finished
        ):
            continue
        records = rundir.read_table(info.path, columns=[UID, STAGE, REASON]).to_pylist()
        uids = []
        for record in records:
            stage = stages.get(record[STAGE])
            if stage is not None and stage.is_transient(record[REASON]):
                uids.append(record[UID])
                report.attempted[record[REASON]] += 1
        if uids:
            retry[int(info.base_name.split(".")[0])] = tuple(uids)
    return retry


def _still_failing(rundir: RunDir, phase: Phase, retry: dict[int, tuple[str, ...]]) -> Counter:
    failing: Counter = Counter()
    for shard, uids in retry.items():
        rejects = rundir.read_table(rundir.rejects_path(phase.name, shard), columns=[UID, REASON])
        mine = rejects.filter(pc.is_in(rejects[UID], value_set=pa.array(uids, pa.string())))
        failing.update(mine[REASON].to_pylist())
    return failing


def _merge_counts(
    old: dict[str, StageCounts], stages: tuple[str, ...], old_records: pa.Table, new: dict[str, StageCounts]
) -> dict[str, StageCounts]:
    """The shard's counts with the retried rows' old path taken out and their new path put in."""
    merged = {name: StageCounts(c.rows_in, c.rows_kept, dict(c.rejected)) for name, c in old.items()}
    for stage, reason in zip(old_records[STAGE].to_pylist(), old_records[REASON].to_pylist()):
        for name in stages[: stages.index(stage)]:  # passed the stages before the one that rejected it
            merged[name].rows_in -= 1
            merged[name].rows_kept -= 1
        merged[stage].rows_in -= 1
        merged[stage].rejected[reason] -= 1
        if not merged[stage].rejected[reason]:
            del merged[stage].rejected[reason]
    for name, counts in new.items():
        merged[name].add(counts)
    return merged


def _invalidate_after(plan: Plan, rundir: RunDir, manifest: Manifest, index: int) -> None:
    """Remove what later phases built on the old result; a resume rebuilds it."""
    later = plan.phases[index + 1 :]
    for phase in later:
        rundir.remove_folder(phase.name)
        rundir.remove_folder(f"{REJECTS_DIR}/{phase.name}")
        if phase.global_stage is not None:
            path = rundir.aggregate_path(phase.global_stage.name)
            if rundir.exists(path):
                rundir.fs.delete_file(path)
    for finisher in plan.finishers:  # the export and the card describe the old rows
        for output in finisher.outputs():
            rundir.remove(output)
    kept = {p.name for p in later}
    manifest.phases = [p for p in manifest.phases if p.name not in kept]
    manifest.export = {}
