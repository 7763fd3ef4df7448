"""The driver: runs a plan into its run directory, resumably, and keeps the manifest.

Order of work: check the run directory (a changed config is refused), read the plan's source into
``00_input`` shards, then for each phase compute the
aggregate of its global stage (or reuse the saved one), process the shards that have no ledger
entry yet, and check that the phase's ledger closes before the next phase starts (and, once per
run, clear the temporary files of writers that were stopped). Then the plan's
finishers: the required ones (the export) as part of the run, the others (the card) after it is
recorded complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
from collections.abc import Callable
from importlib import metadata

from pipelines.engine.ingest import read_input
from pipelines.engine.keyed import (
    count_passes,
    decide_by_key,
    decisions_folder,
    is_done,
    phase_input,
)
from pipelines.engine.ledger import LedgerError, check_phase, check_run, summarise
from pipelines.engine.parts import FinishedRun
from pipelines.engine.phase import PhaseTask, ShardIO
from pipelines.engine.plan import INPUT_PHASE, Plan, fingerprint_diff
from pipelines.engine.rundir import PHASE_LEDGER, RunDir
from pipelines.engine.runner import Runner
from pipelines.stage import KeyedStage, SummedStage
from schemas.manifest import Manifest, PhaseSummary, ShardEntry
from schemas.rejects import INTERNAL_ERROR

log = logging.getLogger(__name__)

#: ``progress(phase, shards_done, shards_total)`` when a phase starts and after every written shard.
Progress = Callable[[str, int, int], None]

VERSIONED_PACKAGES = (
    "vlmcurate",
    "pyarrow",
    "ray",
    "polars",
    "torch",
    "open_clip_torch",
    "img2dataset",
    "transformers",
    "openai",
    "datasketch",
    "pillow",
)


class ConfigChangedError(RuntimeError):
    """The run directory holds a run of a different configuration."""


def run_pipeline(plan: Plan, runner: Runner, progress: Progress | None = None) -> Manifest:
    """Execute ``plan`` with ``runner``, resuming whatever an earlier attempt finished."""
    rundir = RunDir(plan.run_uri)
    with rundir.lock():
        manifest = _open_manifest(rundir, plan)
        try:
            finished = _execute(plan, runner, rundir, manifest, progress)
        except BaseException:
            manifest.status = "failed"
            _write(rundir, manifest)
            raise
        finally:
            # One sweep a run: what writers killed mid-write left (a worker whose batch Ray ran again
            # elsewhere, or an earlier run stopped by force; their names never clash with new files).
            removed = rundir.remove_temporaries()
            if removed:
                log.info("removed %d temporary file(s) left by writers that were stopped", removed)
        manifest.status = "complete"
        _write(rundir, manifest)
        for finisher in plan.finishers:
            if not finisher.required:
                try:
                    finisher.finish(finished)
                except Exception:  # the rows are complete and recorded; only this output failed
                    log.exception("could not write the %s of %s; %s", finisher.name, plan.run_uri, finisher.redo_hint)
    return manifest


def _execute(plan: Plan, runner: Runner, rundir: RunDir, manifest: Manifest, progress: Progress | None) -> FinishedRun:
    """Run what is left of the plan and its required finishers; the run as its other finishers see it
    (``changed``: whether anything was written, shards, an aggregate or the export)."""
    shards, previous, changed = _ingest(plan, runner, rundir, manifest, progress)
    input_phase = INPUT_PHASE
    for phase in plan.phases:
        done = rundir.shard_entries(phase.name)
        if progress:
            progress(phase.name, len(done), len(shards))
        if phase.global_stage is not None:
            changed |= _bind_aggregate(
                phase.global_stage, runner, rundir, input_phase, shards, plan.config.shard_size, manifest
            )
        task = PhaseTask(ShardIO(rundir, input_phase, phase.name), phase.stages)
        pending = [s for s in shards if s not in done]
        changed |= bool(pending)
        for entry in runner.run_phase(task, pending):
            done[entry.shard] = entry
            if progress:
                progress(phase.name, len(done), len(shards))
        closed = not pending and rundir.exists(rundir.path(phase.name, PHASE_LEDGER))
        entries = done if closed else _closed_ledger(rundir, phase.name, shards, done)
        check_phase(phase.name, entries, previous)
        summary = summarise(phase.name, [s.name for s in phase.stages], entries, len(shards))
        _warn_internal_errors(summary, plan.run_uri)
        _set_phase(manifest, summary, plan.phase_names)
        _write(rundir, manifest)
        input_phase, previous = phase.name, entries
    check_run(manifest)
    finished = FinishedRun(plan, runner, rundir, manifest, input_phase, previous, changed)
    for finisher in plan.finishers:
        if finisher.required:
            finished.changed |= finisher.finish(finished)
            _write(rundir, manifest)
    return finished


def _closed_ledger(rundir: RunDir, phase: str, shards: list[int], done: dict[int, ShardEntry]) -> dict[int, ShardEntry]:
    """The phase's entries, once a listing shows every shard's entry on storage (a worker may have
    written to a disk the driver does not see); written as the phase's one ledger file."""
    listed = rundir.finished_shards(phase)
    missing = sorted(set(shards) - listed)
    if missing:
        raise LedgerError(
            f"phase {phase!r} finished without shard(s) {missing[:10]}: their rows are "
            f"unaccounted for (is output_dir on storage every worker writes to?)"
        )
    entries = {shard: done.get(shard) or rundir.shard_entry(phase, shard) for shard in shards}
    rundir.write_phase_ledger(phase, entries)
    return entries


def _warn_internal_errors(summary: PhaseSummary, run_uri: str) -> None:
    """Say so when a stage rejected rows for an error of its own, not of the data."""
    for stage, counts in summary.counts.items():
        rows = counts.rejected.get(INTERNAL_ERROR, 0)
        if rows:
            log.warning(
                "stage %r rejected %d row(s) with %s: an error in vlmcurate or a library, not in the data; "
                "the exceptions are in %s/rejects/%s/ (column detail)",
                stage,
                rows,
                INTERNAL_ERROR,
                run_uri,
                summary.name,
            )


def _open_manifest(rundir: RunDir, plan: Plan) -> Manifest:
    existing = rundir.read_manifest()
    if existing is not None and existing.config_hash != plan.config_hash and rundir.has_shard_entries():
        changes = fingerprint_diff(existing.config.get("fingerprint", {}), plan.fingerprint)
        raise ConfigChangedError(
            f"run directory {plan.run_uri} holds a run of another configuration "
            f"(hash {existing.config_hash}, now {plan.config_hash}). Changed:\n  "
            + "\n  ".join(changes or ["(no readable difference)"])
            + "\nTo keep both, start a new run: add name=<new name> (or output_dir=<other folder>). "
            "To start over, delete the run directory."
        )
    now = _now()
    if existing is not None and existing.config_hash == plan.config_hash:
        versions = _versions()
        before = existing.versions
        changed = {k: f"{before.get(k)} -> {v}" for k, v in versions.items() if before.get(k) != v}
        if changed:
            log.warning("resuming run %s with other package versions: %s", plan.config.name, changed)
        existing.history.append({"resumed_at": now, **({"versions_changed": changed} if changed else {})})
        existing.versions = versions
        existing.status = "running"
        existing.config["pipeline"] = _portable(plan.config)
        return existing
    if existing is not None:
        log.info("run %s finished no shard under its earlier configuration: replacing it", plan.config.name)
    manifest = Manifest(
        name=plan.config.name,
        config_hash=plan.config_hash,
        config={"fingerprint": plan.fingerprint, "pipeline": _portable(plan.config)},
        versions=_versions(),
        created_at=now,
        updated_at=now,
    )
    _write(rundir, manifest)
    return manifest


def _ingest(plan: Plan, runner: Runner, rundir: RunDir, manifest: Manifest, progress: Progress | None):
    """Read the plan's source into ``00_input`` shards (skipping shards already written); the shard
    numbers, their ledger entries, and whether the input was read."""
    summary = next((p for p in manifest.phases if p.name == INPUT_PHASE), None)
    done = rundir.shard_entries(INPUT_PHASE)
    read = summary is None or summary.shards_done != summary.shards_total or len(done) != summary.shards_total
    if read:
        report = (lambda finished, total: progress(INPUT_PHASE, finished, total)) if progress else (lambda *_: None)
        report(len(done), 0)
        total = read_input(plan, runner, rundir, done, report)
        report(len(done), total)
        _set_phase(manifest, summarise(INPUT_PHASE, [plan.source.stage_name], done, total), plan.phase_names)
        _write(rundir, manifest)
    return sorted(done), done, read


def _bind_aggregate(
    planned, runner: Runner, rundir: RunDir, phase: str, shards: list[int], shard_size: int, manifest: Manifest
) -> bool:
    """Give a global stage its aggregate, computing it unless saved; whether it was computed."""
    computed = not bind_saved_aggregate(planned, rundir)
    if computed:
        if isinstance(planned.stage, KeyedStage):
            state = decide_by_key(planned.stage, planned.name, runner, rundir, phase, shards, shard_size)
        elif isinstance(planned.stage, SummedStage):
            source = phase_input(rundir, phase, shards, tuple(planned.stage.compute_columns))
            state = count_passes(planned.stage, planned.name, runner, source)
        else:
            raise TypeError(f"{planned.name}: a GlobalStage is decided as a KeyedStage or a SummedStage")
        rundir.save_aggregate(planned.name, state)  # last: a saved aggregate is a finished one
        bind_saved_aggregate(planned, rundir)
    manifest.aggregates[planned.name] = planned.stage.describe(planned.state)
    _write(rundir, manifest)
    return computed


def bind_saved_aggregate(planned, rundir: RunDir) -> bool:
    """Give a global stage its saved aggregate (workers load it from the run directory). A keyed
    stage needs its decisions by shard too: without them (a run stopped while they were written,
    or made before they were) the aggregate counts as missing and is computed again."""
    found, state = rundir.load_aggregate(planned.name)
    if found and isinstance(planned.stage, KeyedStage):
        found = is_done(rundir, decisions_folder(planned.name))
    if found:
        planned.state = state
        planned.state_source = rundir
    return found


def _portable(config) -> dict:
    """The config as run, with local paths made absolute so the run can be retried from anywhere."""
    raw = config.model_dump()
    for key in ("input", "output_dir"):
        if "://" not in raw[key]:
            raw[key] = os.path.abspath(raw[key])
    return raw


def _set_phase(manifest: Manifest, summary, order: list[str]) -> None:
    phases = {p.name: p for p in manifest.phases}
    phases[summary.name] = summary
    manifest.phases = [phases[name] for name in order if name in phases]


def _write(rundir: RunDir, manifest: Manifest) -> None:
    manifest.updated_at = _now()
    rundir.write_manifest(manifest)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
