"""The url pool as the engine's :class:`~pipelines.engine.parts.PoolSource`: checked when made,
identified by its files' content, read into numbered shards."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from pipelines.engine.parts import InputShard
from pipelines.source.readers import SourceSpec, resolve_files
from pipelines.source.row_hash import UID_SCHEME
from pipelines.source.shards import (
    READ_STAGE,
    ShardRead,
    check_keep_columns,
    plan_parquet_reads,
    probe_source,
    read_planned_shard,
    read_shards,
)
from pipelines.stage import storage
from schemas.columns import UID


class PoolReader:
    """A pool of parquet, csv, tsv or jsonl files (a file, a folder or a glob) as a run's input."""

    stage_name = READ_STAGE

    def __init__(self, spec: SourceSpec) -> None:
        check_keep_columns(spec.keep_columns)
        probe_source(spec)  # fail now, before anything is written
        self.spec = spec
        self.kept_columns = tuple(spec.keep_columns)
        self.unique_column = UID if spec.uid_column else None

    def fingerprint(self) -> dict[str, Any]:
        return {
            "files": file_identities(self.spec.path),
            "format": self.spec.format,
            "max_row_bytes": self.spec.max_row_bytes,
            "uid_scheme": UID_SCHEME,
        }

    def read_shards(self, shard_size: int) -> Iterator[InputShard]:
        return read_shards(self.spec, shard_size)

    def plan_reads(self, shard_size: int) -> list[ShardRead] | None:
        """Parquet pools: the shards planned from the footers, for workers to read in parallel."""
        return plan_parquet_reads(self.spec, shard_size)

    def read(self, planned: ShardRead) -> InputShard:
        return read_planned_shard(self.spec, planned)


def file_identities(path: str) -> list[dict[str, Any]]:
    """Each input file by name, size and a hash of sampled content (not its path or mtime).

    Copying, touching or re-syncing the same data keeps a run resumable; any change of size, or
    of the sampled bytes (head, tail and eight blocks in between), is a change of input. A pool
    on an object store is named relative to its common prefix, as a local one to its folder.
    """
    files = resolve_files(path)
    if storage.is_uri(path):
        keys = [f.partition("://")[2] for f in files]
        root = posixpath.commonpath([posixpath.dirname(k) for k in keys])
        names = [posixpath.relpath(k, root) for k in keys]
    else:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        names = [os.path.relpath(os.path.abspath(f), root) for f in files]
    identities = []
    for name, file in zip(names, files):
        size = storage.file_size(file)
        identities.append({"file": name, "size": size, "sample_blake2b": _sampled_hash(file, size)})
    return identities


def _sampled_hash(location: str, size: int, edge: int = 1 << 16, block: int = 1 << 12, blocks: int = 8) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with storage.open_input_file(location) as f:
        if size <= 2 * edge + blocks * block:
            digest.update(f.read())
        else:
            offsets = [0] + [edge + i * (size - 2 * edge) // blocks for i in range(blocks)] + [size - edge]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(edge if offset in (0, size - edge) else block))
    return digest.hexdigest()
