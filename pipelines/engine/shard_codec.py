"""Shards in flight between the steps of a Ray Data phase: one row per shard, its rows and rejects
as Arrow IPC, its counts as JSON."""

from __future__ import annotations

import json

import pyarrow as pa

from pipelines.engine.chain import PlannedStage, ShardState, apply_stage
from pipelines.engine.phase import ShardIO
from schemas.manifest import StageCounts


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(scalar: pa.Scalar) -> pa.Table:
    return pa.ipc.open_stream(scalar.as_buffer()).read_all()


def encode_states(states: list[ShardState]) -> pa.Table:
    rejects = [s.rejects_table() for s in states]
    return pa.table(
        {
            "shard": pa.array([s.shard for s in states], pa.int64()),
            "rows_in": pa.array([s.rows_in for s in states], pa.int64()),
            "rows": pa.array([_ipc(s.rows) for s in states], pa.large_binary()),
            "rejects": pa.array([None if r is None else _ipc(r) for r in rejects], pa.large_binary()),
            "counts": pa.array([json.dumps({k: c.to_dict() for k, c in s.counts.items()}) for s in states]),
        }
    )


def decode_states(batch: pa.Table) -> list[ShardState]:
    states = []
    for i in range(batch.num_rows):
        rejects = batch["rejects"][i]
        counts = json.loads(batch["counts"][i].as_py())
        states.append(
            ShardState(
                shard=batch["shard"][i].as_py(),
                rows=_from_ipc(batch["rows"][i]),
                rows_in=batch["rows_in"][i].as_py(),
                rejects=[] if not rejects.is_valid else [_from_ipc(rejects)],
                counts={k: StageCounts.from_dict(v) for k, v in counts.items()},
            )
        )
    return states


def load_shards(batch: pa.Table, io: ShardIO) -> pa.Table:
    """A Ray Data batch of shard numbers: each shard read, as rows in flight."""
    return encode_states([io.load(shard) for shard in batch["shard"].to_pylist()])


def finish_shards(batch: pa.Table, io: ShardIO) -> pa.Table:
    """Shards in flight written and checked: their ledger entries as JSON rows."""
    entries = [io.finish(state) for state in decode_states(batch)]
    return pa.table({"entry": pa.array([e.to_json() for e in entries], pa.string())})


def apply_stage_batch(batch: pa.Table, planned: PlannedStage) -> pa.Table:
    """One stage over a Ray Data batch of encoded shard states (the step each stage of a phase maps)."""
    return encode_states([apply_stage(planned, state) for state in decode_states(batch)])
