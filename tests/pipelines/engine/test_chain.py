"""apply_stage: batching, column isolation, merging, rejects, counts and the contract checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.engine.chain import PlannedStage, ShardState, StageContractError, apply_stage, reject_records
from pipelines.stage import GlobalStage, Rejections, Resources, Stage
from schemas.columns import CAPTION, IMAGE, KEEP_PROBABILITY, SOURCE_INDEX, UID, URL, WIDTH, register_column
from schemas.manifest import StageCounts
from schemas.rejects import DETAIL, REASON, REJECT_DETAIL, REJECT_REASON, SHARD, STAGE

CAPTION_WORDS = "test_chain_caption_words"
SCORE = "test_chain_score"
register_column(CAPTION_WORDS, pa.int32(), "test: number of words in the caption")
register_column(SCORE, pa.float64(), "test: a score")


def make_rows(n: int, *, bad: set[int] = frozenset()) -> pa.Table:
    """A shard of ``n`` rows with light columns, the heavy ``image`` and an unregistered binary."""
    return pa.table(
        {
            UID: pa.array([f"u{i:03d}" for i in range(n)], pa.string()),
            SOURCE_INDEX: pa.array(range(100, 100 + n), pa.int64()),
            URL: pa.array([f"http://example.com/{i}.jpg" for i in range(n)], pa.string()),
            CAPTION: pa.array([("bad " if i in bad else "") + f"caption number {i}" for i in range(n)], pa.string()),
            IMAGE: pa.array([b"\x89PNG" + bytes([i % 256]) for i in range(n)], pa.binary()),
            WIDTH: pa.array([10 * i for i in range(n)], pa.int32()),
            "thumb": pa.array([b"t" * (i + 1) for i in range(n)], pa.large_binary()),
        }
    )


def planned(stage: Stage, name: str | None = None, state: Any = None) -> PlannedStage:
    return PlannedStage(name=name or type(stage).name, stage=stage, state=state)


def run(stage: Stage, rows: pa.Table, *, name: str | None = None, shard: int = 3, state: Any = None) -> ShardState:
    return apply_stage(planned(stage, name, state), ShardState(shard=shard, rows=rows, rows_in=rows.num_rows))


# Test stages --------------------------------------------------------------------------------


@dataclass
class Recorder(Stage):
    """Records what it sees; rejects captions starting with 'bad'; writes the word count."""

    name: ClassVar[str] = "recorder"
    input_columns: ClassVar[tuple[str, ...]] = (UID, CAPTION)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION_WORDS,)

    sizes: list[int] = field(default_factory=list)
    columns_seen: list[list[str]] = field(default_factory=list)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.sizes.append(batch.num_rows)
        self.columns_seen.append(batch.column_names)
        words = pc.cast(pc.count_substring_regex(batch[CAPTION], r"\S+"), pa.int32())
        r = Rejections(batch.num_rows)
        r.add(pc.starts_with(batch[CAPTION], "bad"), "starts_bad", pc.binary_join_element_wise("uid ", batch[UID], ""))
        return r.attach(pa.table({CAPTION_WORDS: words}))


@dataclass
class UpperCaption(Stage):
    """Replaces the caption with its upper-case form and adds a score."""

    name: ClassVar[str] = "upper_caption"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION, SCORE)

    def __call__(self, batch: pa.Table) -> pa.Table:
        score = pc.cast(pc.utf8_length(batch[CAPTION]), pa.float64())
        return pa.table({CAPTION: pc.utf8_upper(batch[CAPTION]), SCORE: score})


@dataclass
class RejectLastRows(Stage):
    """Writes nothing; rejects rows whose source_index is at least ``threshold``."""

    name: ClassVar[str] = "reject_last"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX,)

    threshold: int = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        r = Rejections(batch.num_rows)
        r.add(pc.greater_equal(batch[SOURCE_INDEX], self.threshold), "late", "late row")
        return r.attach(batch.select([]))


@dataclass
class Broken(Stage):
    """Returns whatever ``mode`` says, to exercise each contract check."""

    name: ClassVar[str] = "broken"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION_WORDS,)

    mode: str = "ok"

    def __call__(self, batch: pa.Table) -> Any:
        n = batch.num_rows
        words = pa.array([1] * n, pa.int32())
        if self.mode == "drop_row":
            return pa.table({CAPTION_WORDS: words}).slice(0, n - 1)
        if self.mode == "add_row":
            return pa.table({CAPTION_WORDS: pa.array([1] * (n + 1), pa.int32())})
        if self.mode == "undeclared":
            return pa.table({CAPTION_WORDS: words, "sneaky": pa.array([0] * n)})
        if self.mode == "missing":
            return batch.select([])
        if self.mode == "wrong_type":
            return pa.table({CAPTION_WORDS: pa.array([1] * n, pa.int64())})
        if self.mode == "not_table":
            return {CAPTION_WORDS: [1] * n}
        if self.mode == "record_batch":
            return pa.record_batch({CAPTION_WORDS: words})
        return pa.table({CAPTION_WORDS: words})


@dataclass
class RejectUidsInState(GlobalStage):
    """Rejects the uids held in its state; records the state it was given."""

    name: ClassVar[str] = "reject_uids"
    input_columns: ClassVar[tuple[str, ...]] = (UID,)

    states_seen: list[Any] = field(default_factory=list)

    def decide(self, batch: pa.Table, state: Any) -> pa.Table:
        self.states_seen.append(state)
        r = Rejections(batch.num_rows)
        r.add(pc.is_in(batch[UID], value_set=pa.array(sorted(state["drop"]), pa.string())), "in_state", state["why"])
        return r.attach(batch.select([]))


# Batching and column isolation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "expected"),
    [
        (10, 4, [4, 4, 2]),
        (8, 4, [4, 4]),
        (3, 1024, [3]),
        (5, 1, [1, 1, 1, 1, 1]),
    ],
)
def test_batches_have_exactly_batch_size_rows(n, batch_size, expected):
    stage = Recorder(resources=Resources(batch_size=batch_size))
    out = run(stage, make_rows(n))
    assert stage.sizes == expected
    assert out.rows.num_rows == n
    assert out.counts["recorder"] == StageCounts(rows_in=n, rows_kept=n, rejected={})


def test_stage_receives_only_its_input_columns():
    stage = Recorder(resources=Resources(batch_size=3))
    run(stage, make_rows(7))
    assert stage.columns_seen == [[UID, CAPTION]] * 3


# Merging ------------------------------------------------------------------------------------


def test_new_and_replaced_columns_are_merged_in_place():
    rows = make_rows(5)
    out = run(UpperCaption(resources=Resources(batch_size=2)), rows)
    kept = out.rows
    # The replaced column stays where it was; the new one is appended; nothing else changes.
    assert kept.column_names == rows.column_names + [SCORE]
    assert kept[CAPTION].to_pylist() == [c.upper() for c in rows[CAPTION].to_pylist()]
    assert kept[SCORE].to_pylist() == [float(len(c)) for c in rows[CAPTION].to_pylist()]
    assert kept.schema.field(SCORE).type == pa.float64()
    for name in (UID, SOURCE_INDEX, URL, IMAGE, WIDTH, "thumb"):
        assert kept[name].equals(rows[name])
    assert out.rejects == []
    assert out.counts["upper_caption"].closes


@dataclass
class HalfChance(Stage):
    """Weighs every row by one half."""

    name: ClassVar[str] = "half_chance"
    output_columns: ClassVar[tuple[str, ...]] = (KEEP_PROBABILITY,)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({KEEP_PROBABILITY: pa.array([0.5] * batch.num_rows, pa.float32())})


def test_a_keep_probability_multiplies_the_one_the_row_has():
    rows = make_rows(3)
    once = run(HalfChance(), rows).rows
    twice = run(HalfChance(), once).rows
    assert once[KEEP_PROBABILITY].to_pylist() == [0.5] * 3
    assert twice[KEEP_PROBABILITY].to_pylist() == [0.25] * 3
    assert twice.schema.field(KEEP_PROBABILITY).type == pa.float32()


# Rejects ------------------------------------------------------------------------------------


def test_rejected_rows_leave_kept_table_and_become_reject_records():
    rows = make_rows(9, bad={1, 4, 8})
    out = run(Recorder(resources=Resources(batch_size=4)), rows, name="my_recorder", shard=7)

    assert out.rows.num_rows == 6
    assert out.rows[UID].to_pylist() == ["u000", "u002", "u003", "u005", "u006", "u007"]
    assert REJECT_REASON not in out.rows.column_names and REJECT_DETAIL not in out.rows.column_names
    assert out.rows[CAPTION_WORDS].to_pylist() == [3] * 6

    assert out.counts == {"my_recorder": StageCounts(rows_in=9, rows_kept=6, rejected={"starts_bad": 3})}
    assert out.counts["my_recorder"].closes

    assert len(out.rejects) == 1
    records = out.rejects[0]
    assert records.column_names[:5] == [UID, STAGE, REASON, DETAIL, SHARD]
    assert records[UID].to_pylist() == ["u001", "u004", "u008"]
    assert records[STAGE].to_pylist() == ["my_recorder"] * 3  # the ledger name, not the class name
    assert records[REASON].to_pylist() == ["starts_bad"] * 3
    assert records[DETAIL].to_pylist() == ["uid u001", "uid u004", "uid u008"]
    assert records[SHARD].to_pylist() == [7, 7, 7]
    assert records.schema.field(SHARD).type == pa.int32()
    # Light columns (including what the stage wrote) ride along; heavy ones never do.
    assert records[SOURCE_INDEX].to_pylist() == [101, 104, 108]
    assert records[CAPTION].to_pylist() == ["bad caption number 1", "bad caption number 4", "bad caption number 8"]
    assert records[WIDTH].to_pylist() == [10, 40, 80]
    assert records[CAPTION_WORDS].to_pylist() == [4, 4, 4]
    assert IMAGE not in records.column_names
    assert "thumb" not in records.column_names
    assert REJECT_REASON not in records.column_names and REJECT_DETAIL not in records.column_names


def test_rejects_only_in_some_batches_keep_every_row_accounted():
    # Batches 1 and 2 reject nothing (zero-column results), batch 3 rejects: the results concatenate.
    rows = make_rows(10)
    out = run(RejectLastRows(threshold=108, resources=Resources(batch_size=4)), rows)
    assert out.rows[SOURCE_INDEX].to_pylist() == list(range(100, 108))
    assert out.rows.column_names == rows.column_names
    assert out.rejects_table()[UID].to_pylist() == ["u008", "u009"]
    assert out.counts["reject_last"] == StageCounts(10, 8, {"late": 2})


def test_every_row_rejected():
    out = run(RejectLastRows(threshold=0, resources=Resources(batch_size=3)), make_rows(5))
    assert out.rows.num_rows == 0
    assert out.rows.column_names == make_rows(1).column_names
    assert out.counts["reject_last"] == StageCounts(5, 0, {"late": 5})
    assert out.rejects_table().num_rows == 5


def test_rejects_and_counts_accumulate_over_stages():
    rows = make_rows(6, bad={0})
    state = ShardState(shard=2, rows=rows, rows_in=6)
    state = apply_stage(planned(Recorder(resources=Resources(batch_size=4))), state)
    state = apply_stage(planned(RejectLastRows(threshold=104)), state)
    state = apply_stage(planned(UpperCaption()), state)
    assert state.rows_in == 6
    assert state.rows[UID].to_pylist() == ["u001", "u002", "u003"]
    assert list(state.counts) == ["recorder", "reject_last", "upper_caption"]
    assert state.counts["recorder"] == StageCounts(6, 5, {"starts_bad": 1})
    assert state.counts["reject_last"] == StageCounts(5, 3, {"late": 2})
    assert state.counts["upper_caption"] == StageCounts(3, 3, {})
    table = state.rejects_table()
    assert table[UID].to_pylist() == ["u000", "u004", "u005"]
    assert table[STAGE].to_pylist() == ["recorder", "reject_last", "reject_last"]
    # The later stage's records also carry the column the first stage wrote.
    assert table[CAPTION_WORDS].to_pylist() == [4, 3, 3]


def test_reject_records_without_detail_column():
    rows = pa.table({UID: ["a"], REJECT_REASON: pa.array(["r"], pa.string()), CAPTION: ["c"]})
    records = reject_records(rows, "s", 0)
    assert records[DETAIL].to_pylist() == [None]
    assert records.schema.field(DETAIL).type == pa.string()
    assert records.column_names == [UID, STAGE, REASON, DETAIL, SHARD, CAPTION]


# Empty shards -------------------------------------------------------------------------------


def test_empty_shard_works_and_gets_output_columns():
    stage = Recorder(resources=Resources(batch_size=4))
    rows = make_rows(0)
    out = run(stage, rows)
    assert stage.sizes == []
    assert out.rows.num_rows == 0
    assert out.rows.column_names == rows.column_names + [CAPTION_WORDS]
    assert out.rows.schema.field(CAPTION_WORDS).type == pa.int32()
    assert out.rejects == []
    assert out.rejects_table() is None
    assert out.counts["recorder"] == StageCounts(0, 0, {})


def test_empty_shard_replaced_column_keeps_its_type():
    out = run(UpperCaption(), make_rows(0))
    assert out.rows.schema.field(CAPTION).type == pa.string()
    assert out.rows.schema.field(SCORE).type == pa.float64()


# Contract violations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("drop_row", r"returned 3 rows for 4: stages never drop or add rows"),
        ("add_row", r"returned 5 rows for 4"),
        ("undeclared", r"undeclared column\(s\) \['sneaky'\]"),
        ("missing", r"did not return declared column\(s\) \['test_chain_caption_words'\]"),
        ("wrong_type", r"column 'test_chain_caption_words' as int64; schemas declare int32"),
        ("not_table", r"returned dict, not a pyarrow.Table"),
        ("record_batch", r"returned RecordBatch, not a pyarrow.Table"),
    ],
)
def test_contract_violations_raise_stage_contract_error(mode, message):
    with pytest.raises(StageContractError, match=message) as info:
        run(Broken(mode=mode, resources=Resources(batch_size=4)), make_rows(6), name="the_broken_one")
    # The message names the stage (ledger name and class).
    assert "stage 'the_broken_one' (Broken)" in str(info.value)


def test_well_behaved_broken_stage_passes():
    out = run(Broken(mode="ok", resources=Resources(batch_size=4)), make_rows(6))
    assert out.rows[CAPTION_WORDS].to_pylist() == [1] * 6


# GlobalStage --------------------------------------------------------------------------------


def test_global_stage_decide_receives_bound_state():
    stage = RejectUidsInState(resources=Resources(batch_size=2))
    state = {"drop": {"u001", "u004"}, "why": "in the state"}
    out = run(stage, make_rows(5), state=state)
    assert stage.states_seen == [state] * 3
    assert all(seen is state for seen in stage.states_seen)
    assert out.rows[UID].to_pylist() == ["u000", "u002", "u003"]
    records = out.rejects_table()
    assert records[REASON].to_pylist() == ["in_state", "in_state"]
    assert records[DETAIL].to_pylist() == ["in the state", "in the state"]
    assert out.counts["reject_uids"] == StageCounts(5, 3, {"in_state": 2})


def test_planned_stage_is_global():
    assert planned(RejectUidsInState()).is_global
    assert not planned(Recorder()).is_global


def test_reject_columns_must_come_as_a_pair_of_strings():
    from schemas.rejects import REJECT_DETAIL, REJECT_REASON

    @dataclass
    class DetailOnly(Stage):
        name: ClassVar[str] = "detail_only"

        def __call__(self, batch):
            return pa.table({REJECT_DETAIL: pa.nulls(batch.num_rows, pa.string())})

    @dataclass
    class IntReason(Stage):
        name: ClassVar[str] = "int_reason"

        def __call__(self, batch):
            n = batch.num_rows
            return pa.table({REJECT_REASON: pa.array([1] * n), REJECT_DETAIL: pa.nulls(n, pa.string())})

    table = pa.table({"uid": ["a", "b"], "caption": ["x y", "z w"]})
    for stage in (DetailOnly(), IntReason()):
        with pytest.raises(StageContractError, match="reject columns come as a pair of strings"):
            apply_stage(PlannedStage(stage.name, stage), ShardState(0, table, rows_in=2))
