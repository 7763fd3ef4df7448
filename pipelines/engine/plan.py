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
import os
from dataclasses import dataclass
from typing import Any

from pipelines.engine.chain import PlannedStage
from pipelines.engine.config import PipelineConfig, build_stage
from pipelines.source.shards import READ_STAGE, SourceSpec, check_keep_columns, probe_source, resolve_files
from schemas.columns import BASE_COLUMNS, BRIEF_RECORDS, IMAGE, INSTRUCTIONS, column_type, is_transient

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
    source: SourceSpec
    stages: list[PlannedStage]
    phases: list[Phase]
    fingerprint: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return config_hash(self.fingerprint)

    @property
    def run_uri(self) -> str:
        return self.config.output_dir.rstrip("/") + "/" + self.config.name

    @property
    def phase_names(self) -> list[str]:
        return [INPUT_PHASE] + [p.name for p in self.phases]


def _check_export(formats: list[str], final_columns: list[str]) -> None:
    """Fail before the run, not at its end, when an export format lacks the columns it needs."""
    for name in ("webdataset", "llava"):
        if name in formats and IMAGE not in final_columns:
            raise ValueError(
                f"export.formats includes {name}, which needs image bytes, but no stage writes the "
                "image column: add a download stage (pipelines.download:Download) or export parquet only"
            )
    if "llava" in formats and not {INSTRUCTIONS, BRIEF_RECORDS} & set(final_columns):
        raise ValueError(
            "export.formats includes llava, which needs instruction records: add "
            "generators.instruct:InstructGenerate (stage 2) and/or generators.instruct:BriefDescriptions "
            "(stage 1)"
        )


def build_plan(config: PipelineConfig) -> Plan:
    """Resolve and validate the stages, check their columns and split them into phases."""
    keep = tuple(config.columns.keep)
    check_keep_columns(keep)
    source = SourceSpec(
        path=config.input,
        format=config.input_format,
        url_column=config.columns.url,
        caption_column=config.columns.caption,
        uid_column=config.columns.uid,
        keep_columns=keep,
        max_row_bytes=config.input_max_row_bytes,
    )
    probe_source(source)
    stages = [build_stage(entry, i, config.seed) for i, entry in enumerate(config.stages)]
    _check_names(stages)
    final_columns = _check_columns(stages, available=list(BASE_COLUMNS) + list(keep))
    if config.export is not None:
        _check_export(config.export.formats, final_columns)
    phases = _split_phases(stages)
    _check_transient_columns(phases)
    return Plan(config, source, stages, phases, _fingerprint(config, source, stages))


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


def _check_names(stages: list[PlannedStage]) -> None:
    seen: set[str] = {READ_STAGE}  # the source's own line in the ledger
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


def _fingerprint(config: PipelineConfig, source: SourceSpec, stages: list[PlannedStage]) -> dict[str, Any]:
    """What determines the rows of a run (not where or how fast it runs)."""
    return {
        "input": {
            "files": _file_identities(source.path),
            "format": source.format,
            "max_row_bytes": source.max_row_bytes,
        },
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


def _file_identities(path: str) -> list[dict[str, Any]]:
    """Each input file by name, size and a hash of sampled content (not its path or mtime).

    Copying, touching or re-syncing the same data keeps a run resumable; any change of size, or
    of the sampled bytes (head, tail and eight blocks in between), is a change of input.
    """
    files = resolve_files(path)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return [
        {
            "file": os.path.relpath(os.path.abspath(f), root),
            "size": os.path.getsize(f),
            "sample_blake2b": _sampled_hash(f),
        }
        for f in files
    ]


def _sampled_hash(path: str, edge: int = 1 << 16, block: int = 1 << 12, blocks: int = 8) -> str:
    digest = hashlib.blake2b(digest_size=16)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 2 * edge + blocks * block:
            digest.update(f.read())
        else:
            offsets = [0] + [edge + i * (size - 2 * edge) // blocks for i in range(blocks)] + [size - edge]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(edge if offset in (0, size - edge) else block))
    return digest.hexdigest()
