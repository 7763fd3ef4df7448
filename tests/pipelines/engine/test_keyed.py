"""Tests of pipelines/engine/keyed.py with both runners: rows grouped by key across shards,
reduced, and written by shard; the Ray runner's hash shuffle gives the local runner's output."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.engine.keyed import KeyedReduce, output_for_shard, phase_input, shards_with_output
from pipelines.engine.rundir import RunDir
from pipelines.engine.unique_key import KeyRepeats
from pipelines.stage import COUNT, KEY
from schemas.columns import SOURCE_INDEX, UID

SHARD_SIZE = 50
SHARDS = 6


def _key(i: int) -> str:
    """Row i's key: k<i mod 37>, recurring every 37 rows across shards, except every fifth row's."""
    return f"k{i % 37:02d}" if i % 5 else f"unique-{i}"


def _write_input(rundir: RunDir) -> None:
    for shard in range(SHARDS):
        index = list(range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE))
        rundir.write_table(
            rundir.shard_path("00_input", shard), pa.table({UID: [_key(i) for i in index], SOURCE_INDEX: index})
        )


def _input(rundir: RunDir):
    return phase_input(rundir, "00_input", list(range(SHARDS)), (UID, SOURCE_INDEX))


def _outputs(rundir: RunDir, out: str) -> dict[int, list[dict]]:
    return {
        shard: sorted(output_for_shard(rundir, out, shard).to_pylist(), key=lambda r: r[SOURCE_INDEX])
        for shard in shards_with_output(rundir, out)
    }


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_repeats_of_a_key_across_shards_are_found_and_written_by_shard(tmp_path, runner_factory, kind):
    rundir = RunDir(str(tmp_path / "run"))
    _write_input(rundir)
    job = KeyedReduce(rundir, (_input(rundir),), UID, KeyRepeats(UID), "repeats", SHARD_SIZE)
    assert all(facts == {} for facts in runner_factory(kind).reduce_by_key(job))
    outputs = _outputs(rundir, "repeats")
    first: dict[str, int] = {}
    expected = {i: first.setdefault(_key(i), i) for i in range(SHARDS * SHARD_SIZE)}
    expected = {i: f for i, f in expected.items() if f != i}  # every repeat: its first occurrence
    assert len(expected) > 150
    found = {r[SOURCE_INDEX]: r for rows in outputs.values() for r in rows}
    assert {i: r["first_index"] for i, r in found.items()} == expected
    assert all(r[UID] == _key(i) for i, r in found.items())
    assert all(r[SOURCE_INDEX] // SHARD_SIZE == shard for shard, rows in outputs.items() for r in rows)


def test_the_ray_runner_writes_what_the_local_runner_writes(tmp_path, runner_factory):
    outputs = []
    for kind in ("local", "ray"):
        rundir = RunDir(str(tmp_path / kind))
        _write_input(rundir)
        job = KeyedReduce(rundir, (_input(rundir),), UID, KeyRepeats(UID), "out", SHARD_SIZE)
        runner_factory(kind).reduce_by_key(job)
        outputs.append(_outputs(rundir, "out"))
    assert outputs[0] == outputs[1]


def _counts_by_key(batch: pa.Table) -> pa.Table:
    """Rows of each key in a batch (a SummedStage's ``counts``)."""
    counted = batch.group_by(UID).aggregate([(SOURCE_INDEX, "count")])
    return pa.table({KEY: pc.binary_length(counted[UID]).cast(pa.int64()), COUNT: counted[f"{SOURCE_INDEX}_count"]})


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_counts_are_summed_by_key_over_every_shard(tmp_path, runner_factory, kind):
    rundir = RunDir(str(tmp_path / "run"))
    _write_input(rundir)
    totals = runner_factory(kind).sum_by_key(_input(rundir), _counts_by_key)
    lengths = Counter(len(_key(i)) for i in range(SHARDS * SHARD_SIZE))  # the key here: a uid's length
    assert totals.column_names == [KEY, COUNT]
    assert dict(zip(totals[KEY].to_pylist(), totals[COUNT].to_pylist())) == dict(sorted(lengths.items()))
    assert totals[KEY].to_pylist() == sorted(lengths)
