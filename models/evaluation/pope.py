"""A POPE-style object-presence probe (Li et al. 2023, "Evaluating Object Hallucination in LVLMs").

Each image is asked "Is there a {object} in the image?" about objects its boxes contain (answer
yes) and as many it does not contain (answer no). Absent objects are drawn three ways, as in POPE:
``random`` (any object of the set's vocabulary), ``popular`` (the most frequent objects of the
set) and ``adversarial`` (the objects that most often appear together with this image's objects).
A model that says yes to everything scores accuracy 0.5 and yes-ratio 1.0; hallucination shows up
as a yes-ratio above 0.5 and a precision below the recall.

:class:`BoxedImageSet` reads the probe's images from a JSONL of ``{"image", "instances":
[{"category", "bbox"}]}`` rows (the LLaVA context format) or ``{"image", "objects": [...]}``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from models.evaluation.datasets import Skipped

SETTINGS = ("random", "popular", "adversarial")
QUESTION = "Is there a {object} in the image? Answer yes or no."
_FIRST_WORD = re.compile(r"[a-z]+")


class BoxedImageSet:
    """Images and the set of object categories each contains, from a JSONL file."""

    def __init__(self, jsonl: str | Path, images_dir: str | Path | None = None, limit: int | None = None):
        self.jsonl = Path(jsonl)
        self.images_dir = Path(images_dir) if images_dir is not None else self.jsonl.parent / "images"
        self.skipped: list[Skipped] = []
        objects: dict[str, set[str]] = {}
        with self.jsonl.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self._add(line, f"{self.jsonl.name}:{number}", objects)
        self.images: list[str] = list(objects)[:limit]
        self.objects: list[frozenset[str]] = [frozenset(objects[image]) for image in self.images]

    def _add(self, line: str, where: str, objects: dict[str, set[str]]) -> None:
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            self.skipped.append(Skipped(where, f"invalid JSON: {exc}"))
            return
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            self.skipped.append(Skipped(where, "row has no 'image' string"))
            return
        raw = row.get("objects")
        if raw is None:
            raw = [i.get("category") for i in row.get("instances") or [] if isinstance(i, dict)]
        names = {n.strip().lower() for n in raw if isinstance(n, str) and n.strip()} if isinstance(raw, list) else set()
        if not names:
            self.skipped.append(Skipped(row["image"], f"{where}: no object category"))
            return
        objects.setdefault(row["image"], set()).update(names)

    def __len__(self) -> int:
        return len(self.images)

    def objects_by_image(self) -> dict[str, frozenset[str]]:
        return dict(zip(self.images, self.objects))

    def read(self, index: int) -> bytes:
        return (self.images_dir / self.images[index]).read_bytes()


@dataclass(frozen=True)
class ProbeQuestion:
    """One yes/no question: is ``category`` in image number ``image`` (``present``: the truth)."""

    image: int
    category: str
    present: bool
    setting: str

    @property
    def text(self) -> str:
        return QUESTION.format(object=self.category)


def probe_questions(
    objects: Sequence[frozenset[str]], setting: str, *, per_image: int = 3, seed: int = 0
) -> list[ProbeQuestion]:
    """Balanced questions: up to ``per_image`` present objects per image and as many absent ones."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    rng = random.Random(f"{seed}-{setting}")
    frequency = Counter(name for names in objects for name in names)
    together: Counter[tuple[str, str]] = Counter()
    for names in objects:
        together.update(combinations(sorted(names), 2))
    vocabulary = sorted(frequency)
    questions = []
    for index, names in enumerate(objects):
        present = rng.sample(sorted(names), min(per_image, len(names)))
        candidates = [name for name in vocabulary if name not in names]
        if setting == "random":
            absent = rng.sample(candidates, min(len(present), len(candidates)))
        else:
            if setting == "popular":
                weight = {name: frequency[name] for name in candidates}
            else:
                weight = {name: sum(together[tuple(sorted((name, p)))] for p in names) for name in candidates}
            absent = sorted(candidates, key=lambda name: (-weight[name], name))[: len(present)]
        questions += [ProbeQuestion(index, name, True, setting) for name in present]
        questions += [ProbeQuestion(index, name, False, setting) for name in absent]
    return questions


def parse_yes_no(reply: str) -> bool | None:
    """``True`` for a reply that starts with yes, ``False`` for no; ``None`` when it says neither first."""
    match = _FIRST_WORD.search(reply.lower())
    if match is None:
        return None
    return {"yes": True, "no": False}.get(match.group())


def probe_scores(questions: Sequence[ProbeQuestion], replies: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio; a reply that is neither yes nor no counts as wrong."""
    if len(questions) != len(replies) or not questions:
        raise ValueError(f"{len(questions)} questions for {len(replies)} replies (need equal, non-zero)")
    answers = [parse_yes_no(reply) for reply in replies]
    tp = sum(1 for q, a in zip(questions, answers) if q.present and a is True)
    fp = sum(1 for q, a in zip(questions, answers) if not q.present and a is True)
    tn = sum(1 for q, a in zip(questions, answers) if not q.present and a is False)
    said_yes = tp + fp
    precision = tp / said_yes if said_yes else 0.0
    recall = tp / sum(q.present for q in questions) if any(q.present for q in questions) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "questions": len(questions),
        "accuracy": (tp + tn) / len(questions),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": said_yes / len(questions),
        "unanswered": sum(a is None for a in answers),
    }
