"""Whole-pool decisions by key, with nothing gathered on the driver.

A :class:`KeyedReduce` reads some columns of a phase's shards, brings every row of a key
together, reduces each group of keys where it lies and writes what the reduction emits
partitioned by shard, so each shard's later reader loads only its own part. The runner does the
bringing together: ``LocalRunner`` sorts the whole input in its process (the reference for small
pools); ``RayRunner`` hash-partitions it with Ray Data's ``repartition(keys=...)`` and reduces
each partition in a task. The driver holds only the small facts each reduction returns.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.engine.rundir import RunDir
from pipelines.stage import COUNT, KEY, PINNED, KeyedStage, LinkedStage, RunFiles, SummedStage
from pipelines.stage.run_files import shard_name
from pipelines.stage.sampling import systematic_sample
from schemas.columns import SOURCE_INDEX

if TYPE_CHECKING:
    from pipelines.engine.runner import Runner

#: The column of a reduction's output that says which shard a row belongs to.
SHARD_COLUMN = "shard"
DECISIONS_DIR = "decisions"
EDGES_DIR = "edges"
_DONE = "_done"


@dataclass(frozen=True)
class ReduceInput:
    """Parquet files of one run directory that a keyed reduction reads (``columns`` of them);
    ``pinned``: the kept rows of an earlier run, compared but never decided."""

    uri: str
    paths: tuple[str, ...]
    columns: tuple[str, ...]
    pinned: bool = False
    run_number: int = 0  # tells pinned runs apart in their negative source_index

    def files(self) -> RunFiles:
        return RunFiles(self.uri)


@dataclass(frozen=True)
class KeyedReduce:
    """``reduce`` over the rows of ``inputs`` grouped by ``key``.

    Each input table is first turned into ``features`` (when given) and marked with
    :data:`~pipelines.stage.PINNED`; ``reduce`` receives tables that hold every row of each of
    their keys, sorted by key, and returns ``(rows with source_index, facts)``: the rows are
    written under the run's ``out`` folder by shard (``source_index // shard_size``) and the
    runner returns the facts of every call.
    """

    rundir: RunDir
    inputs: tuple[ReduceInput, ...]
    key: str
    reduce: Callable[[pa.Table], tuple[pa.Table, dict[str, Any]]]
    out: str
    shard_size: int
    features: Callable[[pa.Table], pa.Table] | None = None
    by_shard: bool = True  # False: one file per group of keys directly under ``out`` (edges)

    def prepare(self, table: pa.Table, source: ReduceInput) -> pa.Table:
        """One input table as the reduction reads it: features, and whether its rows are pinned."""
        rows = self.features(table) if self.features is not None else table
        if source.pinned:  # negative, and apart per earlier run: never a shard's, never equal
            index = pc.subtract(pa.scalar(-1 - (source.run_number << 40), pa.int64()), rows[SOURCE_INDEX])
            rows = rows.set_column(rows.schema.get_field_index(SOURCE_INDEX), SOURCE_INDEX, index)
        return rows.append_column(PINNED, pa.repeat(pa.scalar(source.pinned), rows.num_rows))

    def reduce_and_write(self, group: pa.Table) -> dict[str, Any]:
        """Reduce one group of keys and write its decided rows by shard; its facts.

        The files of a group are named after its first key, so a retried task overwrites its own.
        """
        if not group.num_rows:
            return {}
        decided, facts = self.reduce(group)
        if decided.num_rows:
            name = hashlib.blake2b(str(group[self.key][0].as_py()).encode(), digest_size=8).hexdigest()
            if self.by_shard:
                write_by_shard(self.rundir, self.out, with_shard(decided, self.shard_size), name)
            else:
                self.rundir.write_table(self.rundir.path(self.out, f"{name}.parquet"), decided)
        return facts


@dataclass(frozen=True)
class EdgeClustering:
    """A :class:`~pipelines.stage.LinkedStage`'s ``cluster`` over every edge file under ``edges``,
    its decided rows written by shard under ``out``."""

    rundir: RunDir
    edges: str
    cluster: Callable[[pa.Table], tuple[pa.Table, dict[str, Any]]]
    out: str
    shard_size: int

    def memory(self) -> int:
        """What the task that clusters needs: the edges decoded (parquet of integers and uids
        grows about fourfold in memory), the graph and the labels; at least 256 MiB."""
        stored = sum(f.size or 0 for f in self.rundir.list_files(self.edges))
        return max(256 << 20, 16 * stored)


def cluster_edges(job: EdgeClustering) -> dict[str, Any]:
    """Read every edge, cluster them, write the decided rows by shard; the cluster's facts."""
    tables = [job.rundir.read_table(path) for path in job.rundir.parquet_files(job.edges)]
    edges = pa.concat_tables(tables) if tables else pa.table({})
    decided, facts = job.cluster(edges)
    write_by_shard(job.rundir, job.out, with_shard(decided, job.shard_size), "clusters")
    return facts


def phase_input(rundir: RunDir, phase: str, shards: list[int], columns: tuple[str, ...]) -> ReduceInput:
    """The finished shards of a phase of this run as a reduction's input."""
    return ReduceInput(rundir.uri, tuple(rundir.shard_path(phase, shard) for shard in shards), columns)


def decide_by_key(
    stage: KeyedStage, name: str, runner: Runner, rundir: RunDir, phase: str, shards: list[int], shard_size: int
) -> Any:
    """A :class:`~pipelines.stage.KeyedStage`'s decision: its rows written by shard under
    :func:`decisions_folder`, its facts summarised; the summary. A
    :class:`~pipelines.stage.LinkedStage`'s reductions write edges instead, which one task then
    clusters into the decided rows."""
    folder = decisions_folder(name)
    linked = isinstance(stage, LinkedStage)
    out = f"{EDGES_DIR}/{name}" if linked else folder
    for stale in {folder, out}:  # those of an earlier, unfinished attempt
        rundir.remove_folder(stale)
    inputs = [phase_input(rundir, phase, shards, tuple(stage.compute_columns))]
    for number, run in enumerate(stage.pinned_runs()):
        inputs.append(_pinned_input(name, run, number, tuple(stage.pinned_columns)))
    model = _fit(stage, runner, rundir, phase, shards, inputs[0])
    features = functools.partial(stage.features, model=model)
    job = KeyedReduce(rundir, tuple(inputs), KEY, stage.reduce, out, shard_size, features, by_shard=not linked)
    facts = runner.reduce_by_key(job)
    if linked:
        clustering = EdgeClustering(rundir, out, stage.cluster, folder, shard_size)
        facts.append(runner.run_task(cluster_edges, clustering, memory=clustering.memory()))
    summary = stage.summarise(facts)
    mark_done(rundir, folder)
    if linked:
        rundir.remove_folder(out)
    return summary


def _fit(stage: KeyedStage, runner: Runner, rundir: RunDir, phase: str, shards: list[int], source: ReduceInput) -> Any:
    """What the stage learns from a sample of the pool before its features are made (None when
    it asks for no sample). The sample is read by tasks, one per file, and fit in one task."""
    entries = rundir.shard_entries(phase)
    rows = sum(entries[shard].rows_out for shard in shards)
    wanted = stage.sample_size(rows) if rows else 0
    if not wanted:
        return None
    parts = list(runner.map_tasks(sample_file, Sampling(source, wanted / rows), list(source.paths)))
    sample = pa.concat_tables([part for part in parts if part.num_rows] or parts)
    sample = sample.take(pc.sort_indices(sample, [(SOURCE_INDEX, "ascending")]))  # in input order, whatever came first
    return runner.run_task(functools.partial(stage.fit, rows=rows), sample, memory=(256 << 20) + 4 * sample.nbytes)


@dataclass(frozen=True)
class Sampling:
    """A sample of ``share`` of the rows of ``source``'s files."""

    source: ReduceInput
    share: float


def sample_file(sampling: Sampling, path: str) -> pa.Table:
    table = sampling.source.files().read_table(path, list(sampling.source.columns))
    return systematic_sample(table, sampling.share)


def _pinned_input(stage: str, run: str, number: int, columns: tuple[str, ...]) -> ReduceInput:
    files = RunFiles(run)
    try:
        paths = files.kept_files()
    except ValueError as error:
        raise ValueError(f"{stage}: earlier run {run!r}: {error}") from None
    if paths:
        missing = [c for c in columns if c not in files.read_schema(paths[0]).names]
        if missing:
            raise ValueError(
                f"{stage}: the kept rows of the earlier run {run!r} have no {missing} column(s), which it compares "
                "(a stage of that run dropped them?)"
            )
    return ReduceInput(run, tuple(paths), columns, pinned=True, run_number=number)


def with_shard(rows: pa.Table, shard_size: int) -> pa.Table:
    """``rows`` and the shard each lies in: a shard of any phase holds the rows of input positions
    ``[shard * shard_size, (shard + 1) * shard_size)``."""
    size = pa.scalar(shard_size, rows.schema.field(SOURCE_INDEX).type)
    return rows.append_column(SHARD_COLUMN, pc.divide(rows[SOURCE_INDEX], size))


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
    """Where a keyed stage's decided rows lie, by shard."""
    return f"{DECISIONS_DIR}/{stage}"


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


#: More counting passes than this is a stage that never finishes.
MAX_COUNT_PASSES = 64


def count_passes(stage: SummedStage, name: str, runner: Runner, source: ReduceInput) -> Any:
    """A :class:`~pipelines.stage.SummedStage`'s state: its counts summed over ``source``, pass
    after pass until it is done."""
    state = None
    for _ in range(MAX_COUNT_PASSES):
        totals = runner.sum_by_key(source, functools.partial(stage.counts, state=state))
        state, done = stage.from_counts(totals, state)
        if done:
            return state
    raise RuntimeError(f"{name}: still not decided after {MAX_COUNT_PASSES} counting passes")


def count_file(source: ReduceInput, path: str, counts: Callable[[pa.Table], pa.Table]) -> pa.Table:
    """A :class:`~pipelines.stage.SummedStage`'s counts of one whole file of ``source``."""
    return counts(source.files().read_table(path, list(source.columns)))


def empty_counts() -> pa.Table:
    return pa.table({KEY: pa.array([], pa.int64()), COUNT: pa.array([], pa.int64())})


def summed_counts(counts: pa.Table) -> pa.Table:
    """Rows of ``KEY`` and ``COUNT`` summed by key, sorted by key (whatever order they came in)."""
    totals = counts.group_by(KEY).aggregate([(COUNT, "sum")]).rename_columns([KEY, COUNT])
    return totals.sort_by(KEY)


def sorted_by_key(table: pa.Table, key: str) -> pa.Table:
    return table.take(pc.sort_indices(table, [(key, "ascending")]))


def count_files(batch: pa.Table, counts: Callable[[pa.Table], pa.Table], source: ReduceInput) -> pa.Table:
    """A Ray Data batch of file paths: the counts of each whole file."""
    return pa.concat_tables([count_file(source, path, counts) for path in batch["path"].to_pylist()])


def prepare_rows(batch: pa.Table, job: KeyedReduce, source: ReduceInput) -> pa.Table:
    return job.prepare(batch, source)


def reduce_partition(batch: pa.Table, job: KeyedReduce) -> pa.Table:
    """One hash partition of a keyed reduction, reduced and written; its facts as a JSON row."""
    return pa.table({"facts": pa.array([json.dumps(job.reduce_and_write(batch))], pa.string())})
