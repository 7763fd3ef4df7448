"""A key the pool supplies (``columns.uid``) must be unique: each repeat after the key's first
occurrence in input order is rejected by the source's stage as ``duplicate_uid``.

The repeats are found by a :class:`~pipelines.engine.keyed.KeyedReduce` over the written input
shards (hash-partitioned by key under Ray), so the driver holds nothing per row; then each shard
that holds repeats is rewritten by a worker, its ledger entry last. Both steps can be repeated
after a crash: the reduction's output is complete once marked done, and rewriting a shard twice
gives the same files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.engine.chain import reject_records
from pipelines.engine.keyed import (
    KeyedReduce,
    is_done,
    mark_done,
    output_for_shard,
    phase_input,
    shards_with_output,
)
from pipelines.engine.ledger import LedgerError
from pipelines.engine.plan import INPUT_PHASE
from pipelines.engine.rundir import RunDir
from pipelines.engine.runner import Runner
from schemas.columns import SOURCE_INDEX
from schemas.manifest import ShardEntry, StageCounts
from schemas.rejects import DUPLICATE_UID, REASON, REJECT_DETAIL, REJECT_REASON

#: Where the repeats are written, by shard.
REPEATS_FOLDER = f"{INPUT_PHASE}/_repeats"
_FIRST = "first_index"


@dataclass(frozen=True)
class KeyRepeats:
    """The reduction: every row whose key was seen at an earlier ``source_index``, with that
    first ``source_index``; no facts."""

    key: str

    def __call__(self, group: pa.Table) -> tuple[pa.Table, dict]:
        table = group.sort_by([(self.key, "ascending"), (SOURCE_INDEX, "ascending")])
        keys = table[self.key].combine_chunks()
        repeat = np.zeros(table.num_rows, dtype=bool)
        if table.num_rows > 1:
            repeat[1:] = pc.equal(keys.slice(1), keys.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(~repeat)
        index = table[SOURCE_INDEX].to_numpy()
        first = index[starts[np.cumsum(~repeat) - 1]]
        at = np.flatnonzero(repeat)
        return pa.table({SOURCE_INDEX: index[at], _FIRST: first[at], self.key: keys.take(at)}), {}


@dataclass(frozen=True)
class RepeatsJob:
    """What a worker needs to reject the repeats of one input shard."""

    rundir: RunDir
    stage: str
    key: str


def reject_repeated_keys(
    runner: Runner, rundir: RunDir, entries: dict[int, ShardEntry], stage: str, key: str, shard_size: int
) -> None:
    """Find the repeats of ``key`` over the input shards of ``entries`` and rewrite the shards that
    hold them (their new entries replace the old ones in ``entries``)."""
    if not is_done(rundir, REPEATS_FOLDER):
        rundir.remove_folder(REPEATS_FOLDER)  # a partial output of an interrupted attempt
        source = phase_input(rundir, INPUT_PHASE, sorted(entries), (key, SOURCE_INDEX))
        runner.reduce_by_key(KeyedReduce(rundir, (source,), key, KeyRepeats(key), REPEATS_FOLDER, shard_size))
        mark_done(rundir, REPEATS_FOLDER)
    shards = [shard for shard in shards_with_output(rundir, REPEATS_FOLDER) if shard in entries]
    for entry in runner.map_tasks(reject_repeats, RepeatsJob(rundir, stage, key), [entries[s] for s in shards]):
        entries[entry.shard] = entry


def reject_repeats(job: RepeatsJob, entry: ShardEntry) -> ShardEntry:
    """Move one shard's repeats from its rows to its rejects: writes rejects, rows, then the entry.

    After an interrupted attempt a repeat may already be in the rejects and no longer in the
    rows: the records are rebuilt from whichever holds it, so the files come out the same.
    """
    rundir, shard = job.rundir, entry.shard
    repeats = output_for_shard(rundir, REPEATS_FOLDER, shard)
    rows = rundir.read_table(rundir.shard_path(INPUT_PHASE, shard))
    hit = pc.is_in(rows[SOURCE_INDEX], repeats[SOURCE_INDEX])
    moved = rows.filter(hit)
    records = reject_records(_marked(moved, repeats, job.key), job.stage, shard)
    rejects_path = rundir.rejects_path(INPUT_PHASE, shard)
    if rundir.exists(rejects_path):
        earlier = rundir.read_table(rejects_path)
        earlier = earlier.filter(pc.invert(pc.is_in(earlier[SOURCE_INDEX], records[SOURCE_INDEX])))
        records = pa.concat_tables([earlier, records], promote_options="default")
    records = records.sort_by(SOURCE_INDEX)
    kept = rows.filter(pc.invert(hit))
    counts = StageCounts(
        rows_in=entry.stages[job.stage].rows_in,
        rows_kept=kept.num_rows,
        rejected={item["values"]: item["counts"] for item in pc.value_counts(records[REASON]).to_pylist()},
    )
    if not counts.closes:
        raise LedgerError(
            f"input shard {shard}: rejecting repeated {job.key}s leaves a ledger that does not close: {counts}"
        )
    new_entry = ShardEntry(INPUT_PHASE, shard, entry.rows_in, kept.num_rows, {job.stage: counts})
    rundir.write_table(rejects_path, records)  # before the rows: a repeat is never only in memory
    rundir.write_table(rundir.shard_path(INPUT_PHASE, shard), kept)
    rundir.write_bytes(rundir.ledger_path(INPUT_PHASE, shard), new_entry.to_json().encode())
    return new_entry


def _marked(rows: pa.Table, repeats: pa.Table, key: str) -> pa.Table:
    """``rows`` (repeats) with the reject reason and the detail naming each one's first occurrence."""
    first = dict(zip(repeats[SOURCE_INDEX].to_pylist(), repeats[_FIRST].to_pylist()))
    details = [
        f"{key} {value!r} first seen at input row {first[index]}"
        for value, index in zip(rows[key].to_pylist(), rows[SOURCE_INDEX].to_pylist())
    ]
    return rows.append_column(REJECT_REASON, pa.repeat(pa.scalar(DUPLICATE_UID), rows.num_rows)).append_column(
        REJECT_DETAIL, pa.array(details, pa.string())
    )
