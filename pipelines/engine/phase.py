"""One phase over one shard: load the previous phase's rows, run the stages, write the result.

:class:`ShardIO` reads a shard of the input phase and writes a finished shard of this phase; it
pickles small (the run directory's URI and two phase names), so Ray ships it to the read and
write tasks without the stages or their state. Both runners call ``load``,
``chain.apply_stage`` and ``finish``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.engine.chain import PlannedStage, ShardState
from pipelines.engine.ledger import check_shard
from pipelines.engine.rundir import RunDir
from schemas.columns import is_transient
from schemas.manifest import ShardEntry


@dataclass(frozen=True)
class ShardIO:
    """Reads shards of ``input_phase`` and writes finished shards of phase ``name``."""

    rundir: RunDir
    input_phase: str
    name: str

    def load(self, shard: int) -> ShardState:
        rows = self.rundir.read_table(self.rundir.shard_path(self.input_phase, shard))
        return ShardState(shard=shard, rows=rows, rows_in=rows.num_rows)

    def finish(self, state: ShardState) -> ShardEntry:
        entry = ShardEntry(
            phase=self.name, shard=state.shard, rows_in=state.rows_in, rows_out=state.rows.num_rows, stages=state.counts
        )
        check_shard(entry)
        rows = state.rows.drop_columns([c for c in state.rows.column_names if is_transient(c)])
        self.rundir.write_shard(entry, rows, state.rejects_table())
        return entry


@dataclass
class PhaseTask:
    """Run ``stages`` over shards read and written by ``io``."""

    io: ShardIO
    stages: list[PlannedStage]

    @property
    def name(self) -> str:
        return self.io.name
