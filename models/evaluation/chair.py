"""Objects named in generated captions against the objects an image holds (CHAIR, Rohrbach et al. 2018).

n-gram metrics reward a caption for its template: "a red circle to the left of a blue square on a
grey background" shares most of its words with any reference of that form, whatever the shapes.
CHAIR counts the objects a caption names from a vocabulary (the label set of the boxes) and
checks each against the image's objects: ``chair_i`` is the share of named objects that are not
there (hallucinated), ``chair_s`` the share of captions with at least one, and ``object_recall``
the share of the images' objects that their captions name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from models.evaluation.caption_metrics import words


def named_objects(caption: str, vocabulary: Iterable[str]) -> set[str]:
    """The vocabulary's names that ``caption`` mentions as whole words (longest names first, so a
    "red circle" is not also counted as a "circle"; a plural "s" or "es" counts as the name)."""
    return _found(caption, _longest_first(vocabulary))


def _longest_first(vocabulary: Iterable[str]) -> list[str]:
    return sorted({" ".join(words(v)) for v in vocabulary if words(v)}, key=len, reverse=True)


def _found(caption: str, names: list[str]) -> set[str]:
    text = " ".join(words(caption))
    found: set[str] = set()
    for name in names:
        pattern = rf"\b{re.escape(name)}(?:e?s)?\b"
        if re.search(pattern, text):
            found.add(name)
            text = re.sub(pattern, " ", text)
    return found


def chair_scores(
    captions: Sequence[str], objects: Sequence[frozenset[str]], vocabulary: Iterable[str] | None = None
) -> dict[str, float | int]:
    """CHAIR_i, CHAIR_s and object recall of ``captions`` (one per image) against each image's ``objects``.

    ``vocabulary`` defaults to every object of ``objects``: an object no image holds is then not
    recognised when a caption names it, so pass the full label set where there is one."""
    if len(captions) != len(objects) or not captions:
        raise ValueError(f"{len(captions)} captions for {len(objects)} object sets (need equal, non-zero)")
    truth = [{" ".join(words(o)) for o in image} for image in objects]
    names = _longest_first(vocabulary if vocabulary is not None else set().union(*truth))
    mentioned = [_found(caption, names) for caption in captions]
    named = sum(len(m) for m in mentioned)
    hallucinated = [m - t for m, t in zip(mentioned, truth)]
    present = sum(len(t) for t in truth)
    return {
        "captions": len(captions),
        "named_objects": named,
        "chair_i": sum(len(h) for h in hallucinated) / named if named else 0.0,
        "chair_s": sum(1 for h in hallucinated if h) / len(captions),
        "object_recall": sum(len(m & t) for m, t in zip(mentioned, truth)) / present if present else 0.0,
    }
