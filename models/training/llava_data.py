"""Streaming VLM training samples: LLaVA records with their images, from an export, shard by shard.

A source is an export's ``llava`` folder (or a run directory / export folder holding one):
the per-shard ``stage1/NNNNN.json`` or ``stage2/NNNNN.json`` lists are read one at a time, each
record's ``image`` resolved against the ``llava`` folder, so memory holds one shard and the
shuffle buffer, never the dataset. A source may also be webdataset tars or parquet with image and
caption (:mod:`models.training.shards`): each pair becomes a stage-1 record whose answer is the
caption. The epoch order is fixed by the seed and the epoch (see
:func:`models.training.shards.epoch_samples`), so a resumed run replays it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from models.training.shards import iter_shard, resolve_shards
from schemas.columns import KEEP_PROBABILITY
from schemas.llava import caption_turns

STAGE_FOLDERS = {1: "stage1", 2: "stage2"}
BRIEF = "brief"  # the response type of stage-1 records


@dataclass(frozen=True)
class VlmSample:
    """One record to train on: its id, encoded image and conversation turns."""

    id: str
    image: bytes
    turns: list[dict[str, str]]
    response_type: str | None = None  # the export's ``meta.response_type`` (brief, conversation, ...)
    keep_probability: float = 1.0  # the export's ``meta.keep_probability`` (online MetaCLIP balancing)


def llava_folder(source: str | Path) -> Path | None:
    """The ``llava`` export folder behind ``source`` (itself, ``export/llava`` or ``llava``), or None."""
    path = Path(source)
    for candidate in (path, path / "llava", path / "export" / "llava"):
        if (candidate / "stage1").is_dir() or (candidate / "stage2").is_dir():
            return candidate
    return None


def resolve_vlm_shards(sources: list[str], record_sets: list[int]) -> list[Path]:
    """Per-shard record files of each of ``record_sets`` (1: stage1/, 2: stage2/) for LLaVA exports;
    image-caption shards otherwise."""
    files: list[Path] = []
    for source in sources:
        folder = llava_folder(source)
        if folder is None:
            files += resolve_shards([source])
            continue
        for stage in record_sets:
            found = sorted((folder / STAGE_FOLDERS[stage]).glob("*.json"))
            if not found:
                raise FileNotFoundError(
                    f"{folder} has no {STAGE_FOLDERS[stage]}/ records: export the run with "
                    f"{'BriefDescriptions' if stage == 1 else 'InstructGenerate'} and "
                    "formats [llava]"
                )
            files += found
    return files


def iter_vlm_file(path: Path, response_types: Collection[str] | None = None) -> Iterator[VlmSample]:
    """The samples of one file: a LLaVA record list, or an image-caption shard as stage-1 records
    (response type ``brief``). With ``response_types``, only records of those types (from each
    record's ``meta.response_type``; a record without one is of none) are read, images included."""
    if path.suffix != ".json":
        if response_types is None or BRIEF in response_types:
            for sample in iter_shard(path):
                yield VlmSample(sample.key, sample.image, caption_turns(sample.caption), BRIEF, sample.keep_probability)
        return
    root = path.parent.parent
    for record in json.loads(path.read_text(encoding="utf-8")):
        meta = record.get("meta") or {}
        kind = meta.get("response_type")
        if response_types is not None and kind not in response_types:
            continue
        image = (root / record["image"]).read_bytes()
        yield VlmSample(str(record["id"]), image, record["conversations"], kind, float(meta.get(KEEP_PROBABILITY, 1.0)))
