"""The column registry: registration, types, heavy flags and the sample schema."""

from __future__ import annotations

import pyarrow as pa
import pytest

import schemas
from schemas.columns import (
    BASE_COLUMNS,
    CAPTION,
    COLUMN_TYPES,
    COLUMNS,
    IMAGE,
    SOURCE_INDEX,
    UID,
    URL,
    WIDTH,
    Column,
    column_type,
    is_heavy,
    register_column,
    sample_schema,
)


def test_base_columns_and_their_types():
    assert BASE_COLUMNS == (UID, SOURCE_INDEX, URL, CAPTION) == ("uid", "source_index", "url", "caption")
    assert column_type(UID) == pa.string()
    assert column_type(SOURCE_INDEX) == pa.int64()
    assert column_type(URL) == pa.string()
    assert column_type(CAPTION) == pa.string()
    assert column_type(IMAGE) == pa.binary()
    assert column_type(WIDTH) == pa.int32()
    assert set(COLUMNS) == set(COLUMN_TYPES)
    assert all(COLUMNS[name].type == COLUMN_TYPES[name] for name in COLUMNS)


def test_heavy_columns():
    assert is_heavy(IMAGE)
    assert not is_heavy(CAPTION)
    assert not is_heavy("not_a_registered_column")


def test_register_new_column():
    column = register_column("test_columns_score", pa.float32(), "test: a score")
    assert column == Column("test_columns_score", pa.float32(), "test: a score", False)
    assert COLUMNS["test_columns_score"] is column
    assert column_type("test_columns_score") == pa.float32()
    assert not is_heavy("test_columns_score")


def test_register_heavy_column():
    column = register_column("test_columns_embedding", pa.list_(pa.float32()), "test: an embedding", heavy=True)
    assert column.heavy
    assert is_heavy("test_columns_embedding")


def test_register_same_type_twice_is_a_no_op():
    first = register_column("test_columns_twice", pa.int16(), "first description")
    second = register_column("test_columns_twice", pa.int16(), "another description")
    assert second is first
    assert COLUMNS["test_columns_twice"].description == "first description"


def test_register_builtin_column_with_its_own_type_is_allowed():
    assert register_column(CAPTION, pa.string(), "caption again") is COLUMNS[CAPTION]


def test_register_different_type_is_an_error():
    register_column("test_columns_typed", pa.int32(), "test")
    expected = r"'test_columns_typed' is already registered as int32 \(heavy=False\), not string"
    with pytest.raises(ValueError, match=expected):
        register_column("test_columns_typed", pa.string(), "test")
    assert column_type("test_columns_typed") == pa.int32()  # unchanged
    with pytest.raises(ValueError, match="already registered"):
        register_column(UID, pa.large_string(), "a uid of another type")
    assert column_type(UID) == pa.string()


def test_column_type_of_unknown_column():
    with pytest.raises(ValueError) as info:
        column_type("test_columns_never_registered")
    message = str(info.value)
    assert "'test_columns_never_registered' is not registered in schemas.columns" in message
    assert "register_column" in message


def test_sample_schema_default_is_base_columns():
    schema = sample_schema()
    assert schema == pa.schema(
        [("uid", pa.string()), ("source_index", pa.int64()), ("url", pa.string()), ("caption", pa.string())]
    )


def test_sample_schema_keeps_requested_order():
    schema = sample_schema([CAPTION, WIDTH, UID])
    assert schema.names == [CAPTION, WIDTH, UID]
    assert schema.field(WIDTH).type == pa.int32()
    assert sample_schema(()).names == []
    with pytest.raises(ValueError, match="nope"):
        sample_schema([UID, "nope"])


def test_package_reexports():
    assert schemas.register_column is register_column
    assert schemas.column_type is column_type
    assert schemas.REJECT_SCHEMA.names == ["uid", "stage", "reason", "detail", "shard"]
