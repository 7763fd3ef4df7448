"""The objects a row's presence questions ask about that are not there, drawn as often as each
object is there elsewhere in the pool.

"Is there a <object> in the image?" teaches a model to look only if the answer cannot be guessed
from the object's name. The present objects a conversation asks about occur in proportion to how
common they are; absent ones drawn uniformly from a vocabulary do not, so a common object is a
"yes" far more often than a "no", and the model learns "a common object is there". POPE's popular
setting asks about the most frequent objects and catches exactly that: on the demo's scenes,
whose shapes and colours are head-heavy, a stage 2 taught with uniform absent objects answered
"yes" to 89% of the popular questions (accuracy 0.39).

:class:`AbsentObjects` counts, over the pool, the rows whose boxes hold each object of the
vocabulary (a :class:`~pipelines.stage.SummedStage`: one key per vocabulary entry), then draws
each row's absent objects without replacement with weight ``(n + 1) / (N - n + 1)`` for an object
held by ``n`` of the ``N`` rows. A row without the object asks about it with odds in proportion
to the rows that have it over those that do not, so over the pool each object is asked about as a
"no" about as often as it is asked about as a "yes". The draw is seeded by the row's uid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from generators.instruct.context import BOX_FORMATS, parse_boxes
from pipelines.stage import COUNT, KEY, Resources, SummedStage, default_resources, storage
from schemas.columns import ABSENT_OBJECTS, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, UID


@dataclass
class AbsentObjects(SummedStage):
    """Writes ``absent_objects``: per row, ``per_row`` objects of ``vocabulary`` its boxes do not
    hold, drawn in proportion to how often the pool holds them (for ``InstructGenerate``'s
    ``absent_column``). Without a ``vocabulary`` or a ``boxes_column`` every row's list is empty,
    so a config can switch the presence questions off (a pool without boxes)."""

    name: ClassVar[str] = "absent_objects"
    output_columns: ClassVar[tuple[str, ...]] = (ABSENT_OBJECTS,)

    vocabulary: list[str] | str | None = None
    boxes_column: str | None = "boxes"
    box_format: str = "xyxy_normalized"
    per_row: int = 3
    seed: int = 0
    resources: Resources = default_resources(batch_size=4096)

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {self.box_format!r}")
        if self.per_row < 1:
            raise ValueError(f"per_row must be >= 1, got {self.per_row}")
        self._names = object_vocabulary(self.vocabulary, "vocabulary")
        self._index = {name: i for i, name in enumerate(self._names)}
        self._active = bool(self._names and self.boxes_column)

    @property
    def input_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        if not self._active:
            return (UID,)
        size = (ORIGINAL_WIDTH, ORIGINAL_HEIGHT) if self.box_format == "xywh_pixels" else ()
        return (UID, self.boxes_column, *size)

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return self.input_columns[1:] or (UID,)

    def identity(self) -> dict[str, Any]:
        return {"vocabulary": self._names if self._active else []}

    def counts(self, batch: pa.Table, state: Any) -> pa.Table:
        """Per vocabulary entry, the rows holding it; key ``len(vocabulary)`` counts the rows with boxes."""
        held = [ids for ids in self._held(batch) if ids is not None]
        keys = np.array([i for ids in held for i in ids] + [len(self._names)] * len(held), np.int64)
        entries, n = np.unique(keys, return_counts=True)
        return pa.table({KEY: pa.array(entries, pa.int64()), COUNT: pa.array(n, pa.int64())})

    def from_counts(self, totals: pa.Table, state: Any) -> tuple[dict[str, Any], bool]:
        counts = np.zeros(len(self._names) + 1, np.int64)
        counts[totals[KEY].to_numpy()] = totals[COUNT].to_numpy()
        return {"rows": int(counts[-1]), "counts": counts[:-1]}, True

    def decide(self, batch: pa.Table, state: dict[str, Any]) -> pa.Table:
        counts, rows = state["counts"], state["rows"]
        log_weight = np.log(counts + 1.0) - np.log(np.maximum(rows - counts, 0) + 1.0)
        drawn: list[list[str]] = []
        for uid, ids in zip(batch[UID].to_pylist(), self._held(batch)):
            if ids is None:
                drawn.append([])
                continue
            # Gumbel top-k: the k largest of log-weight + Gumbel noise are a weighted draw without replacement.
            keys = log_weight + _generator(self.seed, uid).gumbel(size=len(log_weight))
            keys[list(ids)] = -np.inf
            k = min(self.per_row, len(self._names) - len(ids))
            chosen = np.argsort(-keys, kind="stable")[:k]
            drawn.append([self._names[i] for i in chosen])
        return pa.table({ABSENT_OBJECTS: pa.array(drawn, pa.list_(pa.string()))})

    def describe(self, state: dict[str, Any]) -> dict[str, Any]:
        counts, rows = state["counts"], state["rows"]
        top = np.argsort(-counts, kind="stable")[:5]
        return {
            "rows_with_boxes": rows,
            "objects_seen": int((counts > 0).sum()),
            "most_frequent": {self._names[i]: int(counts[i]) for i in top if counts[i] > 0},
        }

    def _held(self, batch: pa.Table) -> list[set[int] | None]:
        """Each row's vocabulary entries, or None where its boxes do not parse (InstructGenerate
        rejects that row with the reason)."""
        missing = [None] * batch.num_rows
        if not self._active:
            return missing
        raw = batch[self.boxes_column].to_pylist()
        widths = batch[ORIGINAL_WIDTH].to_pylist() if ORIGINAL_WIDTH in batch.column_names else missing
        heights = batch[ORIGINAL_HEIGHT].to_pylist() if ORIGINAL_HEIGHT in batch.column_names else missing
        held: list[set[int] | None] = []
        for boxes, width, height in zip(raw, widths, heights):
            try:
                parsed = parse_boxes(boxes, self.box_format, (width, height))
            except (ValueError, TypeError, AttributeError):
                held.append(None)
                continue
            held.append({self._index[b.category] for b in parsed if b.category in self._index})
        return held


def object_vocabulary(value: list[str] | str | None, setting: str) -> list[str]:
    """Object names as a sorted list of distinct names; a string names a text file (a path or a
    URI), one name a line."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = storage.read_bytes(storage.absolute(value)).decode("utf-8").splitlines()
        except (storage.StorageError, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{setting}: cannot read {value!r}: {e}") from None
    names = sorted({name.strip() for name in value if isinstance(name, str) and name.strip()})
    if not names:
        raise ValueError(f"{setting} names no object")
    return names


def _generator(seed: int, uid: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))
