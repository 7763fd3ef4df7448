"""Data definitions shared by every part of vlmcurate: columns, reject records, the manifest."""

from schemas.columns import (
    BASE_COLUMNS,
    CAPTION,
    COLUMN_TYPES,
    COLUMNS,
    HEIGHT,
    IMAGE,
    METACLIP_ENTRIES,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    SHA256,
    SOURCE_INDEX,
    SOURCE_SHA256,
    UID,
    URL,
    WIDTH,
    Column,
    column_type,
    is_heavy,
    register_column,
    sample_schema,
)
from schemas.manifest import Manifest, PhaseSummary, ShardEntry, StageCounts
from schemas.rejects import REJECT_DETAIL, REJECT_REASON, REJECT_SCHEMA

__all__ = [
    "BASE_COLUMNS", "CAPTION", "COLUMN_TYPES", "COLUMNS", "HEIGHT", "IMAGE", "METACLIP_ENTRIES", "ORIGINAL_HEIGHT",
    "ORIGINAL_WIDTH", "SHA256", "SOURCE_INDEX", "SOURCE_SHA256", "UID", "URL", "WIDTH", "Column", "column_type",
    "is_heavy", "register_column", "sample_schema", "Manifest", "PhaseSummary", "ShardEntry",
    "StageCounts", "REJECT_DETAIL", "REJECT_REASON", "REJECT_SCHEMA",
]
