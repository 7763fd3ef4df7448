"""Running a phase's stages over one shard: contract checks, merging, rejects and counts.

Both runners go through :func:`apply_stage`, so a stage behaves identically in-process and on
Ray: same batches of ``resources.batch_size`` rows, same checks, same ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.engine.keyed import decisions_folder, output_for_shard
from pipelines.stage import GlobalStage, KeyedStage, Stage
from schemas.columns import UID, column_type, is_heavy, multiplies
from schemas.manifest import StageCounts
from schemas.rejects import DETAIL, REASON, REJECT_DETAIL, REJECT_REASON, REJECT_SCHEMA, SHARD, STAGE

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
    #: For a GlobalStage: its aggregate, or where to load it from (the run directory) in ``setup``.
    state: Any = None
    state_source: Any = None

    @property
    def is_global(self) -> bool:
        return isinstance(self.stage, GlobalStage)

    @property
    def stateful(self) -> bool:
        """Runs in long-lived workers: it loads something in ``setup`` or carries a global state."""
        return self.stage.has_setup or self.is_global

    def setup(self) -> None:
        if self.is_global and self.state is None and self.state_source is not None:
            found, self.state = self.state_source.load_aggregate(self.name)
            if not found:
                raise RuntimeError(f"the aggregate of global stage {self.name!r} is missing from the run")
        self.stage.setup()

    def __getstate__(self) -> dict[str, Any]:
        """Workers load a global stage's state from the run directory rather than receive it."""
        state = dict(self.__dict__)
        if state.get("state_source") is not None:
            state["state"] = None
        return state

    def shard_state(self, shard: int) -> Any:
        """What ``decide`` gets for the batches of one shard: the aggregate, or for a stage that
        decides by shard the decided rows of that shard alone (None when it has none)."""
        if not isinstance(self.stage, KeyedStage):
            return self.state
        return output_for_shard(self.state_source, decisions_folder(self.name), shard)

    def process(self, batch: pa.Table, shard_state: Any = None) -> pa.Table:
        if isinstance(self.stage, GlobalStage):
            return self.stage.decide(batch, shard_state)
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
    shard_state = planned.shard_state(state.shard) if planned.is_global and num_rows else None
    for offset in range(0, num_rows, batch_size):
        batch = rows.slice(offset, batch_size)
        result = planned.process(batch.select(inputs), shard_state)
        _check_output(planned, batch, result)
        outputs.append(result)
    if outputs:
        result = pa.concat_tables(outputs, promote_options="default")
    else:
        result = _empty_output(planned)
    merged = _merge(rows, result)
    kept, rejects, counts = split_rejected(merged, planned.name, state.shard)
    return ShardState(
        shard=state.shard,
        rows=kept,
        rows_in=state.rows_in,
        rejects=state.rejects + ([rejects] if rejects is not None else []),
        counts={**state.counts, planned.name: counts},
    )


def split_rejected(rows: pa.Table, stage: str, shard: int) -> tuple[pa.Table, pa.Table | None, StageCounts]:
    """Kept rows (reserved columns dropped), reject records and counts of rows a stage marked."""
    counts = StageCounts(rows_in=rows.num_rows)
    if REJECT_REASON not in rows.column_names:
        counts.rows_kept = rows.num_rows
        return rows, None, counts
    rejected_mask = pc.is_valid(rows[REJECT_REASON])
    kept = rows.filter(pc.invert(rejected_mask)).drop_columns(list(RESERVED))
    rejected = rows.filter(rejected_mask)
    for item in pc.value_counts(rejected[REJECT_REASON]).to_pylist():
        counts.rejected[item["values"]] = item["counts"]
    counts.rows_kept = kept.num_rows
    if not counts.closes:
        raise StageContractError(f"stage {stage!r}: ledger does not close: {counts}")
    return kept, (reject_records(rejected, stage, shard) if rejected.num_rows else None), counts


def reject_records(rows: pa.Table, stage: str, shard: int) -> pa.Table:
    """Reject records for rejected ``rows``: the fields of ``REJECT_SCHEMA``, then light columns."""
    n = rows.num_rows
    values = {
        UID: rows[UID],
        STAGE: pa.repeat(pa.scalar(stage, pa.string()), n),
        REASON: rows[REJECT_REASON],
        DETAIL: rows[REJECT_DETAIL] if REJECT_DETAIL in rows.column_names else pa.nulls(n, pa.string()),
        SHARD: pa.repeat(pa.scalar(shard, pa.int32()), n),
    }
    record = {f.name: values[f.name].cast(f.type) for f in REJECT_SCHEMA}
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
    reserved = [c for c in RESERVED if c in result.column_names]
    if reserved and (
        len(reserved) != len(RESERVED) or any(result.schema.field(c).type != pa.string() for c in RESERVED)
    ):
        raise StageContractError(
            f"{where} returned {reserved}: reject columns come as a pair of strings; "
            f"set them with pipelines.stage.Rejections"
        )
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
    """``rows`` with ``result``'s columns set; a column that multiplies (a keep probability that
    several stages weight) takes the product with the value the row already has."""
    for name in result.column_names:
        column = result[name]
        index = rows.schema.get_field_index(name)
        if index >= 0:
            if multiplies(name):
                column = pc.multiply(pc.fill_null(rows[name], 1.0), pc.fill_null(column, 1.0))
            rows = rows.set_column(index, name, column)
        else:
            rows = rows.append_column(name, column)
    return rows
