"""Reading a url pool (parquet, csv, tsv, jsonl) into numbered input shards, every row accounted for."""

from pipelines.source.pool import PoolReader
from pipelines.source.readers import SourceError, SourceSpec, resolve_files
from pipelines.source.shards import READ_STAGE, check_keep_columns, probe_source, read_shards

__all__ = [
    "READ_STAGE",
    "PoolReader",
    "SourceError",
    "SourceSpec",
    "check_keep_columns",
    "probe_source",
    "read_shards",
    "resolve_files",
]
