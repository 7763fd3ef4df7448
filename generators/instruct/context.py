"""What the instruction writer is told about an image: its captions and object boxes, as data.

Captions come from a pool and from captioners, so they are untrusted text: each is stripped of
control characters and of anything that looks like a chat role marker or one of the context's
own delimiters, whitespace is collapsed, and it is capped at ``max_chars`` (at a word boundary).
The rendered context sits between ``<context>`` tags and the system prompt tells the model that
it is data, never instructions.

Boxes are ``category: [x1, y1, x2, y2]`` with coordinates as fractions of the image width and
height, three decimals, as LLaVA's context files write them. They come from a column holding a
list of ``{"category", "bbox"}`` (structs, or the same as a JSON string): ``xyxy`` boxes already
in [0, 1], or COCO's ``xywh`` pixel boxes, normalised with the row's ``original_width`` and
``original_height``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

BOX_FORMATS = ("xyxy_normalized", "xywh_pixels")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_MARKERS = re.compile(
    r"<\|[^|>]{0,40}\|>"                                   # <|im_start|>, <|eot_id|>, ...
    r"|\[/?(?:INST|SYS)\]|<</?SYS>>"                       # Llama-2 style
    r"|</?(?:context|captions|objects|image|s)>"           # our delimiters, <image>, <s>
    r"|#{2,}\s*\w+\s*:?"                                   # ### Human: / ### Instruction
    r"|\b(?:system|assistant|user|human|gpt)\s*:",         # role: prefixes
    re.IGNORECASE)


@dataclass
class Box:
    """One object: its category and [x1, y1, x2, y2] as fractions of the image size."""

    category: str
    bbox: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2

    @property
    def area(self) -> float:
        return max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1])


@dataclass
class Context:
    """The cleaned captions and boxes of one image."""

    captions: list[str]
    boxes: list[Box] = field(default_factory=list)

    def render(self) -> str:
        lines = ["Captions:"] + [f"- {c}" for c in self.captions]
        if self.boxes:
            lines.append("Objects:")
            lines += [f"{b.category}: [{', '.join(f'{v:.3f}' for v in b.bbox)}]" for b in self.boxes]
        return "\n".join(lines)


def clean_text(text: str, max_chars: int) -> str:
    """``text`` without control characters, role markers or delimiters, capped at ``max_chars``."""
    text = _MARKERS.sub(" ", _CONTROL.sub(" ", text))
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[:cut.rfind(" ")] if " " in cut[max_chars // 2:] else cut
    return text


def has_markers(text: str) -> bool:
    """Whether ``text`` holds a role marker or delimiter (a reply that does is off task)."""
    return _MARKERS.search(text) is not None


def build_context(captions: list[str], boxes: Any, *, max_chars: int = 300, max_captions: int = 8,
                  box_format: str = "xyxy_normalized",
                  size: tuple[int | None, int | None] = (None, None)) -> Context:
    """A :class:`Context` from a row's captions (in order, duplicates dropped) and raw boxes (all of
    them: a partial list would make every count wrong)."""
    seen, cleaned = set(), []
    for caption in captions:
        text = clean_text(caption or "", max_chars)
        if text and text.lower() not in seen:
            seen.add(text.lower())
            cleaned.append(text)
    return Context(cleaned[:max_captions], parse_boxes(boxes, box_format, size))


def parse_boxes(raw: Any, box_format: str = "xyxy_normalized",
                size: tuple[int | None, int | None] = (None, None)) -> list[Box]:
    """Boxes from a list of ``{"category", "bbox"}`` (or its JSON); a malformed one is a ValueError."""
    if raw is None or raw == "":
        return []
    items = json.loads(raw) if isinstance(raw, str) else raw
    boxes = []
    for item in items:
        category = clean_text(str(item.get("category") or ""), 40)
        bbox = [float(v) for v in item.get("bbox") or ()]
        if not category or len(bbox) != 4:
            raise ValueError(f"a box needs a category and 4 coordinates, got {item!r}")
        if box_format == "xywh_pixels":
            width, height = size
            if not width or not height:
                raise ValueError("xywh_pixels boxes need the row's original_width and original_height")
            x, y, w, h = bbox
            bbox = [x / width, y / height, (x + w) / width, (y + h) / height]
        bbox = [min(1.0, max(0.0, v)) for v in bbox]
        if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            raise ValueError(f"box {item!r}: x2 < x1 or y2 < y1")
        boxes.append(Box(category, (bbox[0], bbox[1], bbox[2], bbox[3])))
    return boxes
