"""The run directory on disk (local or any pyarrow filesystem): shards, rejects, ledger, manifest.

``output_dir`` may be a local path, a ``file://`` URI or any URI pyarrow opens itself (``s3://``,
``gs://``, ``hdfs://``, ``abfs://``); other schemes go through fsspec when it has an implementation
installed for them (``memory://``, which only the process that wrote it can read; ``gcs://``,
``az://``, ``sftp://`` with their fsspec packages). On a multi-node cluster it must be storage every
node reaches: each worker writes the shards it finishes.

Layout of ``<output_dir>/<run name>/``::

    manifest.json                      config, hash, versions, phases, aggregates, ledger
    <phase>/<shard:05d>.parquet        rows kept by the phase
    <phase>/_ledger/<shard:05d>.json   the shard's ledger entry: the shard is done when it exists
    rejects/<phase>/<shard:05d>.parquet  reject records of the phase
    aggregates/<stage>.pkl             the state of a global stage, reused on resume
    logs/vlmcurate.log                 what Ray and the libraries said (written by the command line)

Every file is written under a hidden temporary name in its final folder and renamed into place,
so a reader never sees a partial file; the ledger entry is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pickle
import socket
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.manifest import Manifest, ShardEntry

MANIFEST = "manifest.json"
LEDGER_DIR = "_ledger"
REJECTS_DIR = "rejects"
AGGREGATES_DIR = "aggregates"
TMP_MARK = ".tmp-"
LOCK = ".lock"


class RunDirInUse(RuntimeError):
    """Another process holds the run directory."""


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


class RunDir:
    """Paths and atomic I/O of one run directory. Picklable, so workers can write shards."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = open_filesystem(uri)
        self.root = self.root.rstrip("/")

    def __reduce__(self):
        return (RunDir, (self.uri,))

    # Paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def uri_of(self, path: str) -> str:
        """``path`` (from :meth:`path` or a listing) as a URI other libraries can open."""
        scheme, sep, _ = self.uri.partition("://")
        return f"{scheme}://{path}" if sep and scheme != "file" else path

    def shard_path(self, phase: str, shard: int) -> str:
        return self.path(phase, f"{shard_name(shard)}.parquet")

    def ledger_path(self, phase: str, shard: int) -> str:
        return self.path(phase, LEDGER_DIR, f"{shard_name(shard)}.json")

    def rejects_path(self, phase: str, shard: int) -> str:
        return self.path(REJECTS_DIR, phase, f"{shard_name(shard)}.parquet")

    def aggregate_path(self, stage: str) -> str:
        return self.path(AGGREGATES_DIR, f"{stage}.pkl")

    # Atomic writes -----------------------------------------------------------------------
    @contextlib.contextmanager
    def open_output(self, path: str):
        """A stream that becomes ``path`` when the block ends without an error (nothing otherwise)."""
        tmp = self._tmp_name(path)
        try:
            with self.fs.open_output_stream(tmp) as out:
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

    # Reads -------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.fs)

    def list_files(self, folder: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        return [f for f in self.fs.get_file_info(selector) if f.type == pafs.FileType.File]

    def parquet_files(self, folder: str) -> list[str]:
        """The finished parquet files directly under ``folder`` (no temporaries), sorted."""
        return sorted(
            f.path for f in self.list_files(folder) if f.path.endswith(".parquet") and TMP_MARK not in f.base_name
        )

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

    def shard_entry(self, phase: str, shard: int) -> ShardEntry:
        return ShardEntry.from_json(self.read_bytes(self.ledger_path(phase, shard)).decode())

    def shard_entries(self, phase: str) -> dict[int, ShardEntry]:
        """Ledger entries of the finished shards of a phase, by shard number."""
        entries = {}
        for info in self.list_files(f"{phase}/{LEDGER_DIR}"):
            if info.base_name.startswith(".") or not info.base_name.endswith(".json"):
                continue
            entry = ShardEntry.from_json(self.read_bytes(info.path).decode())
            entries[entry.shard] = entry
        return entries

    def remove_folder(self, folder: str) -> None:
        if self.fs.get_file_info(self.path(folder)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(folder))

    def has_shard_entries(self) -> bool:
        """Whether any phase of this run has a finished shard."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        for folder in self.fs.get_file_info(selector):
            if folder.type == pafs.FileType.Directory and self.list_files(f"{folder.base_name}/{LEDGER_DIR}"):
                return True
        return False

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for one process at a time (local file systems only).

        A second ``vlmcurate run`` on the same directory would redo the same shards and could
        delete the first one's temporary files; it fails at once instead.
        """
        if not isinstance(self.fs, pafs.LocalFileSystem):
            yield
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
        """Delete temporary files a killed run left behind; return how many."""
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

    def read_manifest(self) -> Manifest | None:
        path = self.path(MANIFEST)
        if not self.exists(path):
            return None
        return Manifest.from_json(self.read_bytes(path).decode())


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``uri``: pyarrow's own for paths and the schemes it knows, else fsspec's."""
    location = uri if "://" in uri else os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(location)
    except pa.ArrowInvalid as error:
        if "Unrecognized filesystem type" not in str(error):
            raise
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as error:  # unknown protocol, or its package is not installed
        raise ValueError(
            f"output_dir {uri!r}: neither pyarrow nor fsspec can open this scheme ({error}); use a "
            f"local path, file://, s3://, gs://, hdfs://, abfs:// or install the fsspec "
            f"implementation for it"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
