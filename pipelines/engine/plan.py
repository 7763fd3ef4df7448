"""From a validated config to an executable plan: stages, column checks, phases, config hash.

Phases are the units that are written to disk. The input is always phase ``00_input``; after
it, a new phase starts before every global stage (its ``compute`` pass needs the rows before it
finished) and after every stage marked ``checkpoint: true``. Phase ``NN_<last stage>`` holds the
rows kept by its last stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipelines.engine.chain import PlannedStage
from pipelines.engine.config import PipelineConfig, build_stage
from pipelines.engine.parts import Finisher, PoolSource
from schemas.columns import BASE_COLUMNS, column_type, is_transient

INPUT_PHASE = "00_input"


@dataclass
class Phase:
    """Consecutive stages run together over each shard, ending in one written folder."""

    name: str
    stages: list[PlannedStage]

    @property
    def global_stage(self) -> PlannedStage | None:
        return self.stages[0] if self.stages and self.stages[0].is_global else None


@dataclass
class Plan:
    """Everything a runner needs to execute a pipeline, and the hash that identifies its output."""

    config: PipelineConfig
    source: PoolSource
    stages: list[PlannedStage]
    phases: list[Phase]
    fingerprint: dict[str, Any]
    finishers: tuple[Finisher, ...] = field(default=())

    @property
    def config_hash(self) -> str:
        return config_hash(self.fingerprint)

    @property
    def run_uri(self) -> str:
        return self.config.output_dir.rstrip("/") + "/" + self.config.name

    @property
    def phase_names(self) -> list[str]:
        return [INPUT_PHASE] + [p.name for p in self.phases]


def make_plan(config: PipelineConfig, source: PoolSource, finishers: tuple[Finisher, ...] = ()) -> Plan:
    """Resolve and validate the stages, check their columns (and the finishers') and split them into phases."""
    stages = [build_stage(entry, i, config.seed) for i, entry in enumerate(config.stages)]
    _check_names(stages, reserved=source.stage_name)
    final_columns = _check_columns(stages, available=list(BASE_COLUMNS) + list(source.kept_columns))
    for finisher in finishers:
        finisher.check(final_columns)
    phases = _split_phases(stages)
    _check_transient_columns(phases)
    return Plan(config, source, stages, phases, _fingerprint(config, source, stages), tuple(finishers))


def config_hash(fingerprint: dict[str, Any]) -> str:
    canonical = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the keys whose values differ between two fingerprints."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += fingerprint_diff(a, b, where + ".")
        elif a != b:
            changes.append(f"{where}: {_short(a)} -> {_short(b)}")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_names(stages: list[PlannedStage], reserved: str) -> None:
    seen: set[str] = {reserved}  # the source's own line in the ledger
    for stage in stages:
        if stage.name in seen:
            raise ValueError(
                f"stage name {stage.name!r} is taken (by another stage, or reserved); give it a distinct "
                f"`name:` in the config"
            )
        seen.add(stage.name)


def _check_columns(stages: list[PlannedStage], available: list[str]) -> list[str]:
    have = list(available)
    for stage in stages:
        reads = set(stage.stage.input_columns)
        if stage.is_global:
            reads |= set(stage.stage.compute_columns)
        missing = sorted(reads - set(have))
        if missing:
            raise ValueError(
                f"stage {stage.name!r} ({stage.import_path}) reads column(s) {missing} that neither "
                f"the input nor an earlier stage provides; available here: {have}"
            )
        for name in stage.stage.output_columns:
            column_type(name)  # a clear error for an unregistered column
            if name not in have:
                have.append(name)
    return have


def _check_transient_columns(phases: list[Phase]) -> None:
    """A transient column is never written to the run: its reader must be in its writer's phase."""
    for phase in phases:
        written: set[str] = set()
        for stage in phase.stages:
            late = sorted(c for c in stage.stage.input_columns if is_transient(c) and c not in written)
            if late:
                raise ValueError(
                    f"stage {stage.name!r} reads {late}, which live only inside a phase and are not written "
                    f"earlier in its phase ({phase.name}); put it right after the stage that writes them, "
                    f"with no checkpoint: and no global stage in between"
                )
            written |= {c for c in stage.stage.output_columns if is_transient(c)}


def _split_phases(stages: list[PlannedStage]) -> list[Phase]:
    groups: list[list[PlannedStage]] = []
    current: list[PlannedStage] = []
    for stage in stages:
        if stage.is_global and current:
            groups.append(current)
            current = []
        current.append(stage)
        if stage.checkpoint:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [Phase(f"{i:02d}_{group[-1].name}", group) for i, group in enumerate(groups, start=1)]


def _fingerprint(config: PipelineConfig, source: PoolSource, stages: list[PlannedStage]) -> dict[str, Any]:
    """What determines the rows of a run (not where or how fast it runs)."""
    return {
        "input": source.fingerprint(),
        "columns": config.columns.model_dump(),
        "shard_size": config.shard_size,
        "stages": {
            f"{i:02d}": {
                "stage": s.import_path,
                "name": s.name,
                "checkpoint": s.checkpoint,
                "params": {k: v for k, v in dataclasses.asdict(s.stage).items() if k != "resources"},
                **({"identity": s.stage.identity()} if s.stage.identity() else {}),
            }
            for i, s in enumerate(stages)
        },
    }
