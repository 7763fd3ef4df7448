"""The Stage contract objects: Resources validation, Rejections bookkeeping, has_setup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pytest

from pipelines.stage import GlobalStage, Rejections, Resources, Stage
from schemas.rejects import REJECT_DETAIL, REJECT_REASON

# Resources -------------------------------------------------------------------------------------


def test_resources_defaults_are_valid():
    r = Resources()
    assert (r.cpus, r.gpus, r.batch_size, r.concurrency) == (1.0, 0.0, 1024, None)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"cpus": 0}, "resources.cpus"),
        ({"cpus": -1.5}, "resources.cpus"),
        ({"gpus": -0.5}, "resources.gpus"),
        ({"batch_size": 0}, "resources.batch_size"),
        ({"batch_size": -3}, "resources.batch_size"),
        ({"concurrency": 0}, "resources.concurrency"),
        ({"concurrency": -2}, "resources.concurrency"),
    ],
)
def test_resources_rejects_bad_values_naming_the_field(kwargs, field_name):
    with pytest.raises(ValueError) as info:
        Resources(**kwargs)
    message = str(info.value)
    assert field_name in message
    assert str(next(iter(kwargs.values()))) in message


def test_resources_accepts_edge_values():
    r = Resources(cpus=0.25, gpus=0, batch_size=1, concurrency=1)
    assert (r.cpus, r.gpus, r.batch_size, r.concurrency) == (0.25, 0, 1, 1)
    assert Resources(gpus=0.5, concurrency=None).gpus == 0.5


# Rejections ------------------------------------------------------------------------------------


def _attached(rejections: Rejections, n: int) -> tuple[list, list]:
    table = rejections.attach(pa.table({"x": list(range(n))}))
    return table[REJECT_REASON].to_pylist(), table[REJECT_DETAIL].to_pylist()


def test_rejections_first_reason_wins():
    r = Rejections(4)
    r.add([True, False, True, False], "first", "d1")
    r.add([True, True, False, False], "second", "d2")
    reasons, details = _attached(r, 4)
    assert reasons == ["first", "second", "first", None]
    assert details == ["d1", "d2", "d1", None]
    assert r.mask.to_pylist() == [True, True, True, False]
    assert r.any


def test_rejections_null_mask_values_count_as_false():
    r = Rejections(3)
    r.add(pa.array([None, True, None], pa.bool_()), "reason")
    assert r.mask.to_pylist() == [False, True, False]
    # A later reason can still claim the rows whose mask was null.
    r.add([True, True, True], "later")
    reasons, _ = _attached(r, 3)
    assert reasons == ["later", "reason", "later"]


def test_rejections_accepts_chunked_and_non_bool_masks():
    r = Rejections(4)
    r.add(pa.chunked_array([[True, False], [False, True]]), "chunked")
    r.add([1, 1, 0, 0], "ints")
    reasons, _ = _attached(r, 4)
    assert reasons == ["chunked", "ints", None, "chunked"]


def test_rejections_per_row_detail_array():
    r = Rejections(3)
    r.add([True, False, True], "why", pa.array(["a", "b", "c"]))
    r.add([True, True, True], "other", ["x", "y", "z"])
    reasons, details = _attached(r, 3)
    assert reasons == ["why", "other", "why"]
    # Each row keeps the detail of the reason that won it, taken from its own position.
    assert details == ["a", "y", "c"]


def test_rejections_non_string_detail_is_cast_to_string():
    r = Rejections(2)
    r.add([False, True], "count", pa.array([7, 8]))
    _, details = _attached(r, 2)
    assert details == [None, "8"]


def test_rejections_scalar_detail_applies_to_all_rejected_rows():
    r = Rejections(3)
    r.add([True, False, True], "why", "same for all")
    _, details = _attached(r, 3)
    assert details == ["same for all", None, "same for all"]


def test_rejections_without_detail_leaves_detail_null():
    r = Rejections(2)
    r.add([True, False], "why")
    r.add([True, True], "other", "late detail")
    reasons, details = _attached(r, 2)
    assert reasons == ["why", "other"]
    # The first reason had no detail; a later reason's detail must not overwrite that row.
    assert details == [None, "late detail"]


def test_rejections_attach_on_zero_column_table_keeps_row_count():
    batch = pa.table({"caption": ["a", "b", "c"]})
    r = Rejections(3)
    r.add([False, True, False], "why", "d")
    out = r.attach(batch.select([]))
    assert out.num_rows == 3
    assert out.column_names == [REJECT_REASON, REJECT_DETAIL]
    assert out.schema.field(REJECT_REASON).type == pa.string()
    assert out.schema.field(REJECT_DETAIL).type == pa.string()
    assert out[REJECT_REASON].to_pylist() == [None, "why", None]


def test_rejections_attach_adds_nothing_when_nothing_rejected():
    batch = pa.table({"caption": ["a", "b"]})
    r = Rejections(2)
    r.add([False, None], "never")
    assert not r.any
    out = r.attach(batch.select([]))
    assert out.num_rows == 2
    assert out.column_names == []
    assert r.attach(batch).column_names == ["caption"]


def test_rejections_attach_checks_row_count():
    r = Rejections(2)
    r.add([True, False], "why")
    with pytest.raises(ValueError, match="2 rows attached to 3 rows"):
        r.attach(pa.table({"x": [1, 2, 3]}), num_rows=3)
    assert r.attach(pa.table({"x": [1, 2]}), num_rows=2).num_rows == 2


@pytest.mark.parametrize("mask", [[True, False], [True, False, False, True]])
def test_rejections_wrong_mask_length_errors(mask):
    r = Rejections(3)
    with pytest.raises(ValueError, match=f"reject mask has {len(mask)} values for 3 rows"):
        r.add(mask, "why")
    assert not r.any


def test_rejections_of_zero_rows():
    r = Rejections(0)
    r.add([], "why", "d")
    assert not r.any
    assert r.attach(pa.table({"x": pa.array([], pa.int64())})).column_names == ["x"]


# Stage.has_setup -------------------------------------------------------------------------------


@dataclass
class _Plain(Stage):
    name: ClassVar[str] = "plain"

    def __call__(self, batch):
        return batch.select([])


@dataclass
class _WithSetup(Stage):
    name: ClassVar[str] = "with_setup"

    def setup(self) -> None:
        self.ready = True


@dataclass
class _InheritsSetup(_WithSetup):
    name: ClassVar[str] = "inherits_setup"


@dataclass
class _Global(GlobalStage):
    name: ClassVar[str] = "global"


def test_has_setup_only_when_overridden():
    assert Stage().has_setup is False
    assert _Plain().has_setup is False
    assert _Global().has_setup is False
    assert _WithSetup().has_setup is True
    assert _InheritsSetup().has_setup is True


def test_base_stage_call_and_global_call_raise():
    batch = pa.table({"x": [1]})
    with pytest.raises(NotImplementedError, match="Stage does not implement __call__"):
        Stage()(batch)
    with pytest.raises(TypeError, match="GlobalStage"):
        _Global()(batch)
    assert _Global().compute_columns == _Global.input_columns
    assert _Global().describe(None) == {}


def test_stage_gets_its_own_resources():
    a, b = _Plain(), _Plain()
    assert a.resources is not b.resources
    assert _Plain(resources=Resources(batch_size=7)).resources.batch_size == 7
