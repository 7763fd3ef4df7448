"""The input phase: the plan's source read into ``00_input`` shards, every row accounted for.

A source that can plan its shards ahead (a parquet pool: from its footers) has them read by the
runner's workers in parallel, each worker writing the shards it read; any other is read in order
here. Either way a shard already written by an earlier attempt is not read again. A pool that
supplies its own uids then has their repeats rejected over the whole pool
(:mod:`pipelines.engine.unique_key`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.engine.ledger import LedgerError, check_phase
from pipelines.engine.parts import InputShard, PoolSource
from pipelines.engine.plan import INPUT_PHASE, Plan
from pipelines.engine.rundir import RunDir
from pipelines.engine.runner import Runner
from pipelines.engine.unique_key import reject_repeated_keys
from schemas.manifest import ShardEntry

#: ``progress(shards_done, shards_total)``; the total is 0 while it is not known yet.
InputProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class InputJob:
    """What a worker needs to read one planned input shard and write it into the run."""

    rundir: RunDir
    source: PoolSource


def write_input_shard(job: InputJob, planned: Any) -> ShardEntry:
    """Read one planned shard (in a worker) and write it; its ledger entry."""
    shard = job.source.read(planned)
    entry = input_entry(shard, job.source.stage_name)
    job.rundir.write_shard(entry, shard.rows, shard.rejects)
    return entry


def input_entry(shard: InputShard, stage_name: str) -> ShardEntry:
    return ShardEntry(
        phase=INPUT_PHASE,
        shard=shard.shard,
        rows_in=shard.counts.rows_in,
        rows_out=shard.rows.num_rows,
        stages={stage_name: shard.counts},
    )


def read_input(plan: Plan, runner: Runner, rundir: RunDir, done: dict[int, ShardEntry], progress: InputProgress) -> int:
    """Write every input shard not in ``done`` (adding their entries to it); the number of shards."""
    source, shard_size = plan.source, plan.config.shard_size
    planned = source.plan_reads(shard_size)
    if planned is None:
        total = 0
        for shard in source.read_shards(shard_size):
            total += 1
            if shard.shard not in done:
                entry = input_entry(shard, source.stage_name)
                rundir.write_shard(entry, shard.rows, shard.rejects)
                done[shard.shard] = entry
                progress(len(done), 0)
    else:
        total = len(planned)
        progress(len(done), total)
        pending = [read for read in planned if read.shard not in done]
        for entry in runner.map_tasks(write_input_shard, InputJob(rundir, source), pending):
            done[entry.shard] = entry
            progress(len(done), total)
    if len(done) != total:
        raise LedgerError(
            f"the input now gives {total} shards but {len(done)} were written earlier: the input changed under the run"
        )
    if source.unique_column:
        reject_repeated_keys(runner, rundir, done, source.stage_name, source.unique_column, shard_size)
    check_phase(INPUT_PHASE, done, None)
    rundir.write_phase_ledger(INPUT_PHASE, done)
    return total
