"""What the driver is handed rather than importing: the pool's source and the run's finishers.

The engine runs phases over shards; where the shards come from (:mod:`pipelines.source`) and what
is made of the finished rows (the export, the dataset card) are parts a job plugs in
(:mod:`pipelines.job` does it for a config), so the engine imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from schemas.manifest import Manifest, ShardEntry, StageCounts

if TYPE_CHECKING:
    from pipelines.engine.plan import Plan
    from pipelines.engine.rundir import RunDir
    from pipelines.engine.runner import Runner


@dataclass
class InputShard:
    """One shard of the pool as read: kept rows, reject records and the read stage's counts."""

    shard: int
    rows: pa.Table
    rejects: pa.Table | None
    counts: StageCounts


class PoolSource(Protocol):
    """The pool a run reads into its input phase, cut into numbered shards in a stable order."""

    #: The source's line in the ledger (a name no stage may take).
    stage_name: str
    #: Input columns the rows carry beside the registered ones (``columns.keep``).
    kept_columns: tuple[str, ...]
    #: A column the pool supplies whose values must be unique (its own uid), or None: the engine
    #: rejects each repeat after the first occurrence in input order, over the whole pool.
    unique_column: str | None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the pool's content (not where it lies): part of the config hash."""
        ...

    def read_shards(self, shard_size: int) -> Iterator[InputShard]:
        """The pool as shards of ``shard_size`` input rows, numbered from 0 in input order."""
        ...

    def plan_reads(self, shard_size: int) -> list[Any] | None:
        """The same shards as reads a worker can do alone (each with its ``shard`` number), for
        the runner to spread; None when the pool must be read in order (then ``read_shards``)."""
        ...

    def read(self, planned: Any) -> InputShard:
        """One planned read, in a worker: the shard ``read_shards`` would give."""
        ...


@dataclass
class FinishedRun:
    """What a finisher works from: the plan, where its rows lie, and whether this attempt changed them."""

    plan: Plan
    runner: Runner
    rundir: RunDir
    manifest: Manifest
    phase: str  # the last phase: the run's kept rows
    entries: dict[int, ShardEntry]  # its ledger, by shard
    changed: bool  # whether this attempt wrote anything before the finisher


class Finisher(Protocol):
    """Something made of a finished run's rows and kept in its run directory (an export, the card).

    A ``required`` finisher is part of the run (its failure fails the run); another one runs after
    the run is recorded complete, and its failure is logged with ``redo_hint``.
    """

    name: str
    required: bool
    redo_hint: str

    def check(self, columns: list[str]) -> None:
        """Raise before the run starts if the final rows will lack a column this finisher needs."""
        ...

    def outputs(self) -> list[str]:
        """Its files and folders, relative to the run directory (removed when a retry changes rows)."""
        ...

    def finish(self, run: FinishedRun) -> bool:
        """Write its output unless it is up to date; whether it wrote anything."""
        ...
