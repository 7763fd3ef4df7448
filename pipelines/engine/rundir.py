"""The run directory as the engine writes it: shards, rejects, ledger, aggregates, manifest, lock.

``output_dir`` may be a local path, a ``file://`` URI or any URI pyarrow opens itself (``s3://``,
``gs://``, ``hdfs://``, ``abfs://``); other schemes go through fsspec when it has an implementation
installed for them (``memory://``, which only the process that wrote it can read; ``gcs://``,
``az://``, ``sftp://`` with their fsspec packages). On a multi-node cluster it must be storage every
node reaches: each worker writes the shards it finishes.

The layout and the reads are in :mod:`pipelines.stage.run_files`. Every file is written under a
hidden temporary name in its final folder and renamed into place, so a reader never sees a
partial file; the ledger entry is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pickle
import shutil
import socket
import tempfile
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.engine.lease import LeaseHeld, lease
from pipelines.stage.run_files import (
    AGGREGATES_DIR,
    LEDGER_DIR,
    MANIFEST,
    PHASE_LEDGER,
    REJECTS_DIR,
    TMP_MARK,
    RunFiles,
    shard_name,
)
from schemas.manifest import Manifest, ShardEntry

__all__ = [
    "AGGREGATES_DIR",
    "LEDGER_DIR",
    "MANIFEST",
    "PHASE_LEDGER",
    "REJECTS_DIR",
    "TMP_MARK",
    "RunDir",
    "RunDirInUse",
    "shard_name",
]

LOCK = ".lock"
#: A file bound for an object store is held in memory up to this size, then in a local temporary file.
SPOOL_BYTES = 64 << 20
COPY_BYTES = 8 << 20


class RunDirInUse(RuntimeError):
    """Another process holds the run directory."""


class RunDir(RunFiles):
    """Atomic writes of one run directory, beside the reads of :class:`RunFiles`. Picklable, so
    workers can write shards."""

    # Atomic writes -----------------------------------------------------------------------
    @property
    def renames_atomically(self) -> bool:
        """Whether files are written under a temporary name and renamed into place (a local or
        distributed file system), rather than put whole in one request (an object store, where a
        rename is a copy and a delete, and a single PUT is already all or nothing)."""
        return isinstance(self.fs, (pafs.LocalFileSystem, pafs.HadoopFileSystem))

    @contextlib.contextmanager
    def open_output(self, path: str):
        """A stream that becomes ``path`` when the block ends without an error (nothing otherwise)."""
        if not self.renames_atomically:
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
                yield spool
                spool.seek(0)
                with self.fs.open_output_stream(path, compression=None) as out:
                    shutil.copyfileobj(spool, out, COPY_BYTES)
            return
        tmp = self._tmp_name(path)
        try:
            with self.fs.open_output_stream(tmp, compression=None) as out:
                yield out
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise
        self.fs.move(tmp, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.open_output(path) as out:
            out.write(data)

    def write_table(self, path: str, table: pa.Table) -> None:
        # Encoded images and other binary payloads do not compress: spend no CPU trying.
        compression = {
            f.name: "none" if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) else "zstd"
            for f in table.schema
        }
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=compression or "zstd")
        self.write_bytes(path, buffer.getvalue())

    def _tmp_name(self, path: str) -> str:
        folder, _, name = path.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        return f"{folder}/.{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"

    # Shards and ledger -------------------------------------------------------------------
    def write_shard(self, entry: ShardEntry, rows: pa.Table, rejects: pa.Table | None) -> None:
        """Write a finished shard: rows, then rejects, then the ledger entry that marks it done."""
        self.write_table(self.shard_path(entry.phase, entry.shard), rows)
        rejects_path = self.rejects_path(entry.phase, entry.shard)
        if rejects is not None:
            self.write_table(rejects_path, rejects)
        elif self.exists(rejects_path):  # left by an earlier attempt at this shard
            self.fs.delete_file(rejects_path)
        self.write_bytes(self.ledger_path(entry.phase, entry.shard), entry.to_json().encode())

    def write_phase_ledger(self, phase: str, entries: dict[int, ShardEntry]) -> None:
        """Close a phase's ledger: every shard's entry in one file, read in one request from now on."""
        shards = [entries[shard].to_dict() for shard in sorted(entries)]
        self.write_bytes(self.path(phase, PHASE_LEDGER), json.dumps({"phase": phase, "shards": shards}).encode())

    def remove_folder(self, folder: str) -> None:
        if self.fs.get_file_info(self.path(folder)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(folder))

    def remove(self, relative: str) -> None:
        """Delete a file or a folder of the run directory, if it is there."""
        kind = self.fs.get_file_info(self.path(relative)).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(relative))
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path(relative))

    def has_shard_entries(self) -> bool:
        """Whether any phase of this run has a finished shard."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        for folder in self.fs.get_file_info(selector):
            if folder.type == pafs.FileType.Directory and self.list_files(f"{folder.base_name}/{LEDGER_DIR}"):
                return True
        return False

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for one process at a time: a file lock on a local file system, a
        renewed lease object elsewhere (:mod:`pipelines.engine.lease`).

        A second ``vlmcurate run`` on the same directory would redo the same shards and could
        delete the first one's temporary files; it fails at once instead.
        """
        if not isinstance(self.fs, pafs.LocalFileSystem):
            try:
                with lease(self):
                    yield
            except LeaseHeld as held:
                raise RunDirInUse(str(held)) from None
            return
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, LOCK), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise RunDirInUse(
                    f"run directory {self.root} is in use by another process ({handle.read().strip() or 'pid unknown'})"
                ) from None
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_temporaries(self) -> int:
        """Delete temporary files killed writers left behind; return how many (none on an object
        store, where nothing is written under a temporary name)."""
        if not self.renames_atomically:
            return 0
        removed = 0
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.startswith(".") and TMP_MARK in info.base_name:
                self.fs.delete_file(info.path)
                removed += 1
        return removed

    # Aggregates and manifest -------------------------------------------------------------
    def save_aggregate(self, stage: str, state: Any) -> None:
        self.write_bytes(self.aggregate_path(stage), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_aggregate(self, stage: str) -> tuple[bool, Any]:
        path = self.aggregate_path(stage)
        if not self.exists(path):
            return False, None
        return True, pickle.loads(self.read_bytes(path))

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_bytes(self.path(MANIFEST), manifest.to_json().encode())
