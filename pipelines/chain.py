"""Running a phase's stages over one shard: contract checks, merging, rejects and counts.

Both runners go through :func:`apply_stage`, so a stage behaves identically in-process and on
Ray: same batches of ``resources.batch_size`` rows, same checks, same ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.stage import GlobalStage, Stage
from schemas.columns import UID, column_type, is_heavy
from schemas.manifest import StageCounts
from schemas.rejects import DETAIL, REASON, REJECT_DETAIL, REJECT_REASON, SHARD, STAGE

RESERVED = (REJECT_REASON, REJECT_DETAIL)


class StageContractError(RuntimeError):
    """A stage returned something that breaks the Stage contract (a bug in the stage)."""


@dataclass
class PlannedStage:
    """A stage as placed in a pipeline: its ledger name and, for a GlobalStage, its state."""

    name: str
    stage: Stage
    import_path: str = ""
    checkpoint: bool = False
    state: Any = None

    @property
    def is_global(self) -> bool:
        return isinstance(self.stage, GlobalStage)

    def setup(self) -> None:
        self.stage.setup()

    def process(self, batch: pa.Table) -> pa.Table:
        if isinstance(self.stage, GlobalStage):
            return self.stage.decide(batch, self.state)
        return self.stage(batch)


@dataclass
class ShardState:
    """One shard between stages: its current rows, the rejects so far and the counts so far."""

    shard: int
    rows: pa.Table
    rows_in: int = 0
    rejects: list[pa.Table] = field(default_factory=list)
    counts: dict[str, StageCounts] = field(default_factory=dict)

    def rejects_table(self) -> pa.Table | None:
        tables = [t for t in self.rejects if t.num_rows]
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")


def apply_stage(planned: PlannedStage, state: ShardState) -> ShardState:
    """Run one stage over a shard in batches; return the kept rows, new rejects and counts."""
    rows = state.rows
    num_rows = rows.num_rows
    inputs = list(planned.stage.input_columns)
    outputs = []
    batch_size = planned.stage.resources.batch_size
    for offset in range(0, num_rows, batch_size):
        batch = rows.slice(offset, batch_size)
        result = planned.process(batch.select(inputs))
        _check_output(planned, batch, result)
        outputs.append(result)
    if outputs:
        result = pa.concat_tables(outputs, promote_options="default")
    else:
        result = _empty_output(planned)
    merged = _merge(rows, result)

    counts = StageCounts(rows_in=num_rows)
    if REJECT_REASON in merged.column_names:
        reason = merged[REJECT_REASON]
        rejected_mask = pc.is_valid(reason)
        rejected = merged.filter(rejected_mask)
        kept = merged.filter(pc.invert(rejected_mask)).drop_columns(list(RESERVED))
        for item in pc.value_counts(rejected[REJECT_REASON]).to_pylist():
            counts.rejected[item["values"]] = item["counts"]
        new_rejects = [reject_records(rejected, planned.name, state.shard)]
    else:
        kept, new_rejects = merged, []
    counts.rows_kept = kept.num_rows
    if not counts.closes:
        raise StageContractError(f"stage {planned.name!r}: ledger does not close: {counts}")
    return ShardState(
        shard=state.shard,
        rows=kept,
        rows_in=state.rows_in,
        rejects=state.rejects + new_rejects,
        counts={**state.counts, planned.name: counts},
    )


def reject_records(rows: pa.Table, stage: str, shard: int) -> pa.Table:
    """Reject records for rejected ``rows``: uid, stage, reason, detail, shard, then light columns."""
    n = rows.num_rows
    record = {
        UID: rows[UID],
        STAGE: pa.repeat(pa.scalar(stage, pa.string()), n),
        REASON: rows[REJECT_REASON] if REJECT_REASON in rows.column_names else pa.nulls(n, pa.string()),
        DETAIL: rows[REJECT_DETAIL] if REJECT_DETAIL in rows.column_names else pa.nulls(n, pa.string()),
        SHARD: pa.repeat(pa.scalar(shard, pa.int32()), n),
    }
    for name in rows.column_names:
        if name in record or name in RESERVED or _is_heavy(rows.schema.field(name)):
            continue
        record[name] = rows[name]
    return pa.table(record)


def _is_heavy(field_: pa.Field) -> bool:
    return is_heavy(field_.name) or pa.types.is_binary(field_.type) or pa.types.is_large_binary(field_.type)


def _check_output(planned: PlannedStage, batch: pa.Table, result: Any) -> None:
    where = f"stage {planned.name!r} ({type(planned.stage).__name__})"
    if not isinstance(result, pa.Table):
        raise StageContractError(f"{where} returned {type(result).__name__}, not a pyarrow.Table")
    if result.num_rows != batch.num_rows:
        raise StageContractError(
            f"{where} returned {result.num_rows} rows for {batch.num_rows}: stages never drop or "
            f"add rows; mark drops with pipelines.stage.Rejections"
        )
    declared = set(planned.stage.output_columns)
    extra = [c for c in result.column_names if c not in declared and c not in RESERVED]
    if extra:
        raise StageContractError(f"{where} returned undeclared column(s) {extra}; declared: {sorted(declared)}")
    missing = [c for c in planned.stage.output_columns if c not in result.column_names]
    if missing:
        raise StageContractError(f"{where} did not return declared column(s) {missing}")
    for name in planned.stage.output_columns:
        expected, got = column_type(name), result.schema.field(name).type
        if got != expected:
            raise StageContractError(f"{where} returned column {name!r} as {got}; schemas declare {expected}")


def _empty_output(planned: PlannedStage) -> pa.Table:
    return pa.schema([pa.field(n, column_type(n)) for n in planned.stage.output_columns]).empty_table()


def _merge(rows: pa.Table, result: pa.Table) -> pa.Table:
    for name in result.column_names:
        column = result[name]
        index = rows.schema.get_field_index(name)
        if index >= 0:
            rows = rows.set_column(index, name, column)
        else:
            rows = rows.append_column(name, column)
    return rows
