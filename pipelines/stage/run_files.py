"""Read-only access to a run directory (local or any pyarrow or fsspec filesystem): its layout,
paths and reads. Stages use it to read an earlier run's kept rows; the engine's
:class:`~pipelines.engine.rundir.RunDir` adds the writes.

Layout of ``<output_dir>/<run name>/``::

    manifest.json                      config, hash, versions, phases, aggregates, ledger
    <phase>/<shard:05d>.parquet        rows kept by the phase
    <phase>/_ledger/<shard:05d>.json   the shard's ledger entry: the shard is done when it exists
    rejects/<phase>/<shard:05d>.parquet  reject records of the phase
    aggregates/<stage>.pkl             the state of a global stage, reused on resume
    logs/vlmcurate.log                 what Ray and the libraries said (written by the command line)
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.stage.storage import open_filesystem
from schemas.manifest import Manifest, ShardEntry

MANIFEST = "manifest.json"
LEDGER_DIR = "_ledger"
#: A finished phase's whole ledger in one file (one request to read, wherever the run lies).
PHASE_LEDGER = "_ledger.json"
REJECTS_DIR = "rejects"
AGGREGATES_DIR = "aggregates"
TMP_MARK = ".tmp-"


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


class RunFiles:
    """Paths and reads of one run directory. Picklable: it travels to workers as its URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = open_filesystem(uri)
        self.root = self.root.rstrip("/")

    def __reduce__(self):
        return (type(self), (self.uri,))

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

    # Reads -------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.fs)

    def read_schema(self, path: str) -> pa.Schema:
        return pq.read_schema(path, filesystem=self.fs)

    def list_files(self, folder: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        return [f for f in self.fs.get_file_info(selector) if f.type == pafs.FileType.File]

    def parquet_files(self, folder: str) -> list[str]:
        """The finished parquet files directly under ``folder`` (no temporaries), sorted."""
        return sorted(
            f.path for f in self.list_files(folder) if f.path.endswith(".parquet") and TMP_MARK not in f.base_name
        )

    def shard_entry(self, phase: str, shard: int) -> ShardEntry:
        return ShardEntry.from_json(self.read_bytes(self.ledger_path(phase, shard)).decode())

    def shard_entries(self, phase: str) -> dict[int, ShardEntry]:
        """Ledger entries of the finished shards of a phase, by shard number: from the phase's
        ledger file once the phase has closed, else one read per finished shard."""
        whole = self.path(phase, PHASE_LEDGER)
        if self.exists(whole):
            entries = [ShardEntry.from_dict(d) for d in json.loads(self.read_bytes(whole))["shards"]]
            return {entry.shard: entry for entry in entries}
        entries = {}
        for info in self.list_files(f"{phase}/{LEDGER_DIR}"):
            if info.base_name.startswith(".") or not info.base_name.endswith(".json"):
                continue
            entry = ShardEntry.from_json(self.read_bytes(info.path).decode())
            entries[entry.shard] = entry
        return entries

    def finished_shards(self, phase: str) -> set[int]:
        """The shards of a phase with a ledger entry, from a listing alone (no entry is read)."""
        return {
            int(info.base_name.removesuffix(".json"))
            for info in self.list_files(f"{phase}/{LEDGER_DIR}")
            if not info.base_name.startswith(".") and info.base_name.endswith(".json")
        }

    def read_manifest(self) -> Manifest | None:
        path = self.path(MANIFEST)
        if not self.exists(path):
            return None
        return Manifest.from_json(self.read_bytes(path).decode())

    def kept_files(self) -> list[str]:
        """The parquet files of the rows a completed run kept (its final phase), in shard order."""
        manifest = self.read_manifest()
        if manifest is None or manifest.status != "complete" or manifest.final_phase is None:
            raise ValueError(f"{self.uri!r} is not a completed run (no manifest.json with status complete)")
        return self.parquet_files(manifest.final_phase)
