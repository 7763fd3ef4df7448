"""The ``llava`` export format: images and instruction JSON laid out as LLaVA's ``train.py`` reads them.

Under ``<export folder>/llava/``:

- ``images/<export shard:05d>/<key>.<ext>``: the image of every kept row that has at least one
  record, written once, the key from :func:`pipelines.export.keys.sample_key` and the extension from the
  bytes. One subfolder per export shard keeps a folder at ``samples_per_shard`` files at most
  (10,000 by default), so millions of images never share one directory listing.
- ``stage1/NNNNN.json`` and ``stage2/NNNNN.json``: per export shard, a JSON list of the shard's
  records in row order: stage 1 from ``brief_records`` (projector pretraining), stage 2 from
  ``instructions`` (instruction tuning). Each is :func:`schemas.llava.llava_json`, its ``image``
  the path relative to ``llava/`` (pass that folder as LLaVA's ``--image_folder``); a row with a
  ``keep_probability`` below 1 (online balancing) has it under ``meta`` for the bundled trainer.
- ``stage1.json`` and ``stage2.json``: the single lists LLaVA reads, written after every shard
  by copying the per-shard files' bodies one after another (no more than a chunk in memory).
- ``counts.json``: how many images and records of each stage were written, in total and per shard.

A run with only one of the two columns gets only that stage's files; a run with neither is an
error naming the stage to add. A row with an empty or null list contributes nothing to that
stage, and a row with no record in either gets no image. Every record is checked again with
:func:`schemas.llava.conversation_problem` (roles, empty turns, the image token once in the first
human turn; no length limit, which is the generator's setting) before any file of its shard is
written, and a failing one stops the export with its id. The per-shard files have a fixed layout
(one record per line), so the merged files, like everything else, are byte-identical for the same run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.engine.rundir import RunDir
from pipelines.export.keys import image_extension, sample_key
from schemas.columns import BRIEF_RECORDS, IMAGE, INSTRUCTIONS, KEEP_PROBABILITY, UID
from schemas.llava import conversation_problem, llava_json

LLAVA = "llava"
IMAGES = "images"
COUNTS = "counts.json"
#: Output name of each stage and the column its records come from, in the order they are written.
STAGES = (("stage1", BRIEF_RECORDS), ("stage2", INSTRUCTIONS))
_EMPTY = b"[]\n"
_HEAD, _TAIL = b"[\n", b"\n]\n"
_CHUNK = 8 << 20


def llava_stages(schema: pa.Schema) -> list[tuple[str, str]]:
    """The ``(stage, column)`` pairs a run with ``schema`` exports; an error when it has neither."""
    stages = [(stage, column) for stage, column in STAGES if column in schema.names]
    if not stages:
        raise ValueError(
            f"llava export needs the {BRIEF_RECORDS} or {INSTRUCTIONS} column: add "
            "generators.instruct.stage:BriefDescriptions (stage 1) and/or "
            "generators.instruct.stage:InstructGenerate (stage 2), or drop llava from export.formats"
        )
    if IMAGE not in schema.names:
        raise ValueError("llava export needs the image column: add a download stage (pipelines.download:Download)")
    return stages


def write_llava_shard(rundir: RunDir, folder: str, index: int, rows: pa.Table) -> dict[str, int]:
    """Write export shard ``index`` of ``rows``: its images and per-stage JSON; return its counts.

    Every record is converted and checked before anything is written.
    """
    stages = llava_stages(rows.schema)
    name = f"{index:05d}"
    uids = rows[UID].to_pylist()
    chances = rows[KEEP_PROBABILITY].to_pylist() if KEEP_PROBABILITY in rows.column_names else [None] * len(uids)
    records = {stage: _lists(rows[column].to_pylist()) for stage, column in stages}
    needed = [any(records[stage][i] for stage, _ in stages) for i in range(rows.num_rows)]
    images = _image_paths(name, uids, rows[IMAGE], needed)
    files = {}
    for stage, column in stages:
        lines = []
        for uid, chance, row_records in zip(uids, chances, records[stage]):
            for record in row_records:
                converted = llava_json(record, image=images[uid][0])
                if chance is not None and chance < 1:  # online balancing: the trainer draws each epoch
                    converted["meta"][KEEP_PROBABILITY] = round(float(chance), 6)
                _check(converted, uid, column)
                lines.append(json.dumps(converted, ensure_ascii=False).encode("utf-8"))
        files[stage] = (_HEAD + b",\n".join(lines) + _TAIL if lines else _EMPTY, len(lines))
    for relative, image in images.values():
        rundir.write_bytes(rundir.path(folder, LLAVA, relative), image)
    for stage, (data, _) in files.items():
        rundir.write_bytes(rundir.path(folder, LLAVA, stage, f"{name}.json"), data)
    return {IMAGES: len(images), **{stage: n for stage, (_, n) in files.items()}}


def finish_llava(rundir: RunDir, folder: str, phase: str, shards: list[tuple[int, dict[str, int]]]) -> None:
    """Merge each stage's per-shard files into ``<stage>.json`` and write ``counts.json``."""
    if shards:
        present = [stage for stage, _ in STAGES if stage in shards[0][1]]
    else:  # nothing kept: the phase's schema still says which stages the run has
        files = rundir.parquet_files(phase)
        present = [s for s, _ in llava_stages(pq.read_schema(files[0], filesystem=rundir.fs))] if files else []
    ordered = sorted(shards, key=lambda s: s[0])
    for stage in present:
        with rundir.open_output(rundir.path(folder, LLAVA, f"{stage}.json")) as out:
            first = True
            for index, _ in ordered:
                first = _copy_body(rundir, rundir.path(folder, LLAVA, stage, f"{index:05d}.json"), out, first)
            out.write(_EMPTY if first else _TAIL)
    keys = [IMAGES, *present]
    counts = {key: sum(c[key] for _, c in ordered) for key in keys}
    counts["shards"] = {f"{index:05d}": {key: c[key] for key in keys} for index, c in ordered}
    rundir.write_bytes(rundir.path(folder, LLAVA, COUNTS), json.dumps(counts, indent=1).encode())


def _image_paths(
    name: str, uids: list[str], column: pa.ChunkedArray, needed: list[bool]
) -> dict[str, tuple[str, bytes]]:
    """By uid, the path relative to the llava folder and the bytes of each needed row's image."""
    images: dict[str, tuple[str, bytes]] = {}
    keys: set[str] = set()
    for uid, image, need in zip(uids, column.to_pylist(), needed):
        if not need:
            continue
        if not image:
            raise ValueError(f"llava export: row {uid!r} has records but no image bytes")
        key = sample_key(uid)
        if key in keys:
            raise ValueError(f"llava export: two rows of export shard {name} share the key {key!r} (uid {uid!r})")
        keys.add(key)
        images[uid] = (f"{IMAGES}/{name}/{key}.{image_extension(image)}", image)
    return images


def _lists(values: list[Any]) -> list[list[dict[str, Any]]]:
    return [value or [] for value in values]


def _check(record: dict[str, Any], uid: str, column: str) -> None:
    """Refuse to write a record LLaVA's trainer could not use; the message names it."""
    if not isinstance(record["id"], str) or not record["id"]:
        raise ValueError(f"llava export: a record of row {uid!r} ({column}) has no id")
    problem = conversation_problem(record["conversations"], max_chars=sys.maxsize)
    if problem:
        raise ValueError(
            f"llava export: record {record['id']!r} of row {uid!r} ({column}) is not a valid "
            f"LLaVA conversation: {problem[0]}: {problem[1]}"
        )


def _copy_body(rundir: RunDir, path: str, out, first: bool) -> bool:
    """Append the records of the per-shard file ``path`` to ``out``; return whether none is written yet."""
    size = rundir.fs.get_file_info(path).size
    if size == len(_EMPTY):
        return first
    out.write(_HEAD if first else b",\n")
    with rundir.fs.open_input_file(path) as f:
        f.seek(len(_HEAD))
        remaining = size - len(_HEAD) - len(_TAIL)
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{path} ended early")
            out.write(chunk)
            remaining -= len(chunk)
    return False
