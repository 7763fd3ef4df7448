"""The run manifest and the per-shard ledger entries it is built from.

A run directory holds, per phase, one ledger entry per finished shard
(``<phase>/_ledger/<shard>.json``): a shard is done when its entry exists. ``manifest.json``
at the top of the run gathers the config and its hash, package versions, the phases, the
global aggregates and the ledger totals; the runner rewrites it at every phase boundary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_FORMAT = 1


@dataclass
class StageCounts:
    """Rows that entered a stage, rows it kept, rows it rejected by reason."""

    rows_in: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def closes(self) -> bool:
        return self.rows_in == self.rows_kept + self.rows_rejected

    def add(self, other: StageCounts) -> None:
        self.rows_in += other.rows_in
        self.rows_kept += other.rows_kept
        for reason, n in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_kept": self.rows_kept, "rejected": dict(sorted(self.rejected.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageCounts:
        return cls(int(d["rows_in"]), int(d["rows_kept"]), {k: int(v) for k, v in d["rejected"].items()})


@dataclass
class ShardEntry:
    """The ledger entry of one finished shard of one phase."""

    phase: str
    shard: int
    rows_in: int
    rows_out: int
    stages: dict[str, StageCounts]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = {name: c.to_dict() for name, c in self.stages.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardEntry:
        stages = {name: StageCounts.from_dict(c) for name, c in d["stages"].items()}
        return cls(d["phase"], int(d["shard"]), int(d["rows_in"]), int(d["rows_out"]), stages)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardEntry:
        return cls.from_dict(json.loads(text))


@dataclass
class PhaseSummary:
    """A phase as recorded in the manifest: its stages, shards and summed counts."""

    name: str
    stages: list[str]
    shards_done: int
    shards_total: int
    rows_in: int
    rows_out: int
    counts: dict[str, StageCounts]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = {name: c.to_dict() for name, c in self.counts.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseSummary:
        counts = {name: StageCounts.from_dict(c) for name, c in d["counts"].items()}
        return cls(
            d["name"], list(d["stages"]), d["shards_done"], d["shards_total"], d["rows_in"], d["rows_out"], counts
        )


@dataclass
class Manifest:
    """``manifest.json``: what a run is, what produced it, and where every row went."""

    name: str
    config_hash: str
    config: dict[str, Any]
    versions: dict[str, str]
    created_at: str
    updated_at: str
    status: str = "running"  # running | complete | failed
    phases: list[PhaseSummary] = field(default_factory=list)
    aggregates: dict[str, Any] = field(default_factory=dict)
    #: One entry per resume: when, and which package versions changed since the last attempt.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The export of the kept rows, once written: settings, folder, shards and rows.
    export: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def final_phase(self) -> str | None:
        return self.phases[-1].name if self.phases else None

    def stage_totals(self) -> dict[str, StageCounts]:
        """Counts per stage over the whole run, in pipeline order."""
        totals: dict[str, StageCounts] = {}
        for phase in self.phases:
            for name, counts in phase.counts.items():
                totals.setdefault(name, StageCounts()).add(counts)
        return totals

    def to_json(self) -> str:
        d = asdict(self)
        d["phases"] = [p.to_dict() for p in self.phases]
        d["ledger"] = {name: c.to_dict() for name, c in self.stage_totals().items()}
        return json.dumps(d, indent=2, sort_keys=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {d.get('format')!r} is not {MANIFEST_FORMAT}")
        return cls(
            name=d["name"],
            config_hash=d["config_hash"],
            config=d["config"],
            versions=d["versions"],
            created_at=d["created_at"],
            updated_at=d["updated_at"],
            status=d["status"],
            phases=[PhaseSummary.from_dict(p) for p in d["phases"]],
            aggregates=d.get("aggregates", {}),
            history=d.get("history", []),
            export=d.get("export", {}),
        )
