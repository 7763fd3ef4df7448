"""Exporting a finished run: webdataset tars for open_clip's trainer, parquet, and LLaVA's layout.

The kept rows of the last phase, in shard order, are cut into export shards of
``samples_per_shard`` rows each (uniform sizes, whatever each pipeline shard kept), and written
in parallel by the runner:

- ``webdataset/NNNNN.tar``: per sample ``<key>.jpg`` (or ``.png`` / ``.webp``, as encoded),
  ``<key>.txt`` (the caption) and ``<key>.json`` (every other column but binary and heavy ones
  such as embeddings, the uid included), members in sample order with fixed metadata so the
  same run gives byte-identical tars; ``sizes.json`` maps each tar to its sample count, as open_clip's
  ``--dataset-type webdataset`` expects. The key is the uid when it is safe for webdataset
  (letters, digits, ``_`` and ``-``, as vlmcurate's own uids are); a pool-supplied uid with dots
  or slashes, which webdataset would split, or one shaped like a hashed key, gets a stable hash
  of it instead, so two distinct uids never share a key.
- ``parquet/NNNNN.parquet``: the same rows with every column, image bytes included.
- ``llava/``: images under ``images/NNNNN/`` (one folder per export shard) and the instruction
  records as LLaVA's JSON, per shard (``stage1/NNNNN.json``, ``stage2/NNNNN.json``) and merged
  (``stage1.json`` from ``brief_records``, ``stage2.json`` from ``instructions``, only the stages
  the run has), with ``counts.json``; written by :mod:`pipelines.export.llava`.

Files are written under temporary names and renamed; ``_export.json`` is written last and
records the export settings, so a rerun with the same settings skips the export and a rerun
with other settings rewrites it.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.engine.rundir import RunDir
from pipelines.export.keys import image_extension, sample_key
from pipelines.export.llava import finish_llava, write_llava_shard
from schemas.columns import CAPTION, IMAGE, UID, is_heavy
from schemas.manifest import ShardEntry

WEBDATASET = "webdataset"
PARQUET = "parquet"
LLAVA = "llava"
EXPORT_FORMATS = (WEBDATASET, PARQUET, LLAVA)
DONE = "_export.json"
SIZES = "sizes.json"


@dataclass(frozen=True)
class ExportShard:
    """Export shard ``index``: ``(pipeline shard, first row, rows)`` pieces of the last phase."""

    index: int
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def rows(self) -> int:
        return sum(length for _, _, length in self.pieces)


@dataclass(frozen=True)
class ExportJob:
    """Everything a worker needs to write one export shard."""

    rundir: RunDir
    phase: str
    folder: str
    formats: tuple[str, ...]


def plan_export(entries: dict[int, ShardEntry], samples_per_shard: int) -> list[ExportShard]:
    """Cut the kept rows, in pipeline-shard order, into export shards of equal size."""
    pieces: list[list[tuple[int, int, int]]] = []
    filled = samples_per_shard
    for shard in sorted(entries):
        start, remaining = 0, entries[shard].rows_out
        while remaining:
            if filled == samples_per_shard:
                pieces.append([])
                filled = 0
            take = min(remaining, samples_per_shard - filled)
            pieces[-1].append((shard, start, take))
            start, remaining, filled = start + take, remaining - take, filled + take
    return [ExportShard(i, tuple(p)) for i, p in enumerate(pieces)]


def export_settings(formats: list[str], samples_per_shard: int, phase: str, rows: int) -> dict[str, Any]:
    return {"formats": sorted(formats), "samples_per_shard": samples_per_shard, "phase": phase, "rows": rows}


def export_done(rundir: RunDir, folder: str, settings: dict[str, Any]) -> bool:
    path = rundir.path(folder, DONE)
    return rundir.exists(path) and json.loads(rundir.read_bytes(path)) == settings


def write_export_shard(job: ExportJob, shard: ExportShard) -> tuple[int, int, dict[str, int] | None]:
    """Write one export shard in every format; return ``(index, rows, llava counts or None)``."""
    tables = []
    for pipeline_shard, start, length in shard.pieces:
        table = job.rundir.read_table(job.rundir.shard_path(job.phase, pipeline_shard))
        tables.append(table.slice(start, length))
    rows = pa.concat_tables(tables) if tables else pa.table({})
    name = f"{shard.index:05d}"
    if WEBDATASET in job.formats:
        with job.rundir.open_output(job.rundir.path(job.folder, WEBDATASET, f"{name}.tar")) as out:
            write_webdataset(rows, out)
    if PARQUET in job.formats:
        job.rundir.write_table(job.rundir.path(job.folder, PARQUET, f"{name}.parquet"), rows)
    llava = None
    if LLAVA in job.formats:
        llava = write_llava_shard(job.rundir, job.folder, shard.index, rows)
    return shard.index, rows.num_rows, llava


def finish_export(
    rundir: RunDir, folder: str, settings: dict[str, Any], counts: list[tuple[int, int, dict[str, int] | None]]
) -> None:
    """Write what needs every shard (``sizes.json``, LLaVA's merged files), then ``_export.json``."""
    counts = sorted(counts, key=lambda c: c[0])
    if WEBDATASET in settings["formats"]:
        sizes = {f"{index:05d}.tar": rows for index, rows, _ in counts}
        rundir.write_bytes(rundir.path(folder, WEBDATASET, SIZES), json.dumps(sizes, indent=1).encode())
    if LLAVA in settings["formats"]:
        finish_llava(rundir, folder, settings["phase"], [(index, llava) for index, _, llava in counts])
    rundir.write_bytes(rundir.path(folder, DONE), json.dumps(settings, indent=1).encode())


def write_webdataset(rows: pa.Table, out) -> None:
    """``rows`` as a webdataset tar streamed to ``out``: image, caption and JSON per sample."""
    if IMAGE not in rows.column_names:
        raise ValueError("webdataset export needs the image column: add a download stage, or export parquet only")
    light = [
        c
        for c in rows.column_names
        if c not in (IMAGE, CAPTION)
        and not is_heavy(c)
        and not pa.types.is_binary(rows.schema.field(c).type)
        and not pa.types.is_large_binary(rows.schema.field(c).type)
    ]
    meta_rows = rows.select(light).to_pylist()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for image, caption, meta in zip(rows[IMAGE].to_pylist(), rows[CAPTION].to_pylist(), meta_rows):
            key = sample_key(meta[UID])
            _add(tar, f"{key}.{image_extension(image)}", image)
            _add(tar, f"{key}.txt", caption.encode("utf-8"))
            record = {name: _jsonable(value) for name, value in {**meta, CAPTION: caption}.items()}
            _add(tar, f"{key}.json", json.dumps(record, ensure_ascii=False, default=str).encode("utf-8"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _jsonable(value: Any) -> Any:
    """Values JSON can hold: non-finite floats become null, dates ISO text, containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
