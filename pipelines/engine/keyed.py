"""Whole-pool decisions by key, with nothing gathered on the driver.

A :class:`KeyedReduce` reads some columns of a phase's shards, brings every row of a key
together, reduces each group of keys where it lies and writes what the reduction emits
partitioned by shard, so each shard's later reader loads only its own part. The runner does the
bringing together: ``LocalRunner`` sorts the whole input in its process (the reference for small
pools); ``RayRunner`` hash-partitions it with Ray Data's ``repartition(keys=...)`` and reduces
each partition in a task. The driver holds only the number of rows written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.engine.rundir import RunDir
from pipelines.stage.run_files import shard_name
from schemas.columns import SOURCE_INDEX

#: The column of a reduction's output that says which shard a row belongs to.
SHARD_COLUMN = "shard"
DECISIONS_DIR = "decisions"
_DONE = "_done"


@dataclass(frozen=True)
class KeyedReduce:
    """``reduce`` over the rows of ``phase`` grouped by ``key``: it receives tables that hold every
    row of each of their keys, sorted by key, and returns rows with a :data:`SHARD_COLUMN`; they
    are written under the run's ``out`` folder, partitioned by shard."""

    rundir: RunDir
    phase: str
    shards: tuple[int, ...]
    columns: tuple[str, ...]
    key: str
    reduce: Callable[[pa.Table], pa.Table]
    out: str

    def input_paths(self) -> list[str]:
        return [self.rundir.shard_path(self.phase, shard) for shard in self.shards]

    def reduce_and_write(self, group: pa.Table) -> int:
        """Reduce one group of keys and write its output by shard; the rows written.

        The files of a group are named after its first key, so a retried task overwrites its own.
        """
        if not group.num_rows:
            return 0
        emitted = self.reduce(group)
        if not emitted.num_rows:
            return 0
        name = hashlib.blake2b(str(group[self.key][0].as_py()).encode(), digest_size=8).hexdigest()
        write_by_shard(self.rundir, self.out, emitted, name)
        return emitted.num_rows


def write_by_shard(rundir: RunDir, out: str, rows: pa.Table, name: str) -> None:
    """``rows`` under ``out``, one file ``<shard>/<name>.parquet`` per value of their shard column."""
    if not rows.num_rows:
        return
    rows = rows.sort_by(SHARD_COLUMN)
    shards = rows[SHARD_COLUMN].to_numpy()
    starts = np.flatnonzero(np.diff(shards, prepend=shards[0] - 1))
    for start, end in zip(starts, [*starts[1:], len(shards)]):
        part = rows.slice(int(start), int(end - start)).drop_columns([SHARD_COLUMN])
        rundir.write_table(rundir.path(out, shard_name(int(shards[start])), f"{name}.parquet"), part)


def decisions_folder(stage: str) -> str:
    """Where a global stage's :class:`~pipelines.stage.ShardDecisions` lie, by shard."""
    return f"{DECISIONS_DIR}/{stage}"


def write_decisions(rundir: RunDir, stage: str, rows: pa.Table, shard_size: int) -> None:
    """A global stage's decided rows, partitioned by the shard their ``source_index`` lies in
    (a shard of any phase holds the rows of input positions ``[shard * shard_size, ...)``)."""
    rundir.remove_folder(decisions_folder(stage))  # those of an earlier aggregate
    shard = pc.divide(rows[SOURCE_INDEX], pa.scalar(shard_size, rows.schema.field(SOURCE_INDEX).type))
    write_by_shard(rundir, decisions_folder(stage), rows.append_column(SHARD_COLUMN, shard), "decided")
    mark_done(rundir, decisions_folder(stage))


def is_done(rundir: RunDir, out: str) -> bool:
    """Whether a reduction into ``out`` finished (its output is complete)."""
    return rundir.exists(rundir.path(out, _DONE))


def mark_done(rundir: RunDir, out: str) -> None:
    rundir.write_bytes(rundir.path(out, _DONE), b"")


def shards_with_output(rundir: RunDir, out: str) -> list[int]:
    """The shards a finished reduction wrote rows for (one listing)."""
    selector = pafs.FileSelector(rundir.path(out), allow_not_found=True)
    return sorted(
        int(info.base_name) for info in rundir.fs.get_file_info(selector) if info.type == pafs.FileType.Directory
    )


def output_for_shard(rundir: RunDir, out: str, shard: int) -> pa.Table | None:
    """What a reduction wrote for one shard, or None."""
    files = rundir.parquet_files(f"{out}/{shard_name(shard)}")
    if not files:
        return None
    return pa.concat_tables([rundir.read_table(path) for path in files])


def sorted_by_key(table: pa.Table, key: str) -> pa.Table:
    return table.take(pc.sort_indices(table, [(key, "ascending")]))
