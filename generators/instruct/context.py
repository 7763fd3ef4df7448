"""What the instruction writer is told about an image: its captions and object boxes, as data.

Captions come from a pool and from captioners, so they are untrusted text, and the cleaner is
structural rather than a list of known tokens (:func:`clean_text`):

- only a bounded prefix is read (``SCAN_FACTOR`` times ``max_chars``), so one huge caption costs
  bounded time;
- line breaks and tabs become spaces, and every invisible character is dropped: control, format,
  private-use, surrogate and unassigned code points (Unicode categories Cc, Cf, Co, Cs, Cn: zero-width
  characters, bidi controls, tag characters, the soft hyphen) and the other default-ignorable ones
  (variation selectors, Hangul fillers). The rest is NFKC-normalised, which folds fullwidth and
  other compatibility forms (``＜``, ``𝐬𝐲𝐬𝐭𝐞𝐦``) into plain ones;
- text shaped like a special token (``<`` and ``>`` around up to 64 characters without spaces,
  an upper-case word in square brackets) is removed, and then the characters every turn or special
  token and our own ``<context>`` delimiters are built from are neutralised: what is left of ``<``,
  ``>`` and their look-alikes becomes spaces and square brackets become parentheses, so no
  ``<|im_start|>``, ``<start_of_turn>``, ``</s>``, ``[INST]`` or ``<<SYS>>`` survives in any spelling;
- role markers (``user:``, ``Assistant :``, ``|system|``, ``### Instruction``) are found on a
  skeleton of the text in which Cyrillic, Greek and other look-alike letters, accents and combining
  marks are folded to plain Latin, and removed from the text;
- whitespace is collapsed and the result capped at ``max_chars`` (at a word boundary).

The rendered context sits between ``<context>`` tags and the system prompt tells the model that it
is data, never instructions. :func:`has_markers` applies the same normalisation and folding to a
model's reply.

Boxes are ``category: [x1, y1, x2, y2]`` with coordinates as fractions of the image width and
height, three decimals, as LLaVA's context files write them. They come from a column holding a
list of ``{"category", "bbox"}`` (structs, or the same as a JSON string): ``xyxy`` boxes already
in [0, 1], or COCO's ``xywh`` pixel boxes, normalised with the row's ``original_width`` and
``original_height``. A value that is not such a list, or is larger than ``MAX_BOXES`` boxes or
``MAX_BOXES_JSON_CHARS`` characters of JSON, is a ValueError (the row's ``bad_boxes``).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any

BOX_FORMATS = ("xyxy_normalized", "xywh_pixels")
#: How many characters of a caption are read, as a multiple of the ``max_chars`` kept.
SCAN_FACTOR = 8
#: The most boxes one row may have, and the longest JSON string a boxes value may be.
MAX_BOXES = 1000
MAX_BOXES_JSON_CHARS = 500_000

_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
# Default-ignorable code points outside those categories: the combining grapheme joiner, Hangul
# fillers, Khmer inherent vowels, Mongolian and Unicode variation selectors, the tag block's tail.
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xE0000, 0xE0FFF),
)
# Line breaks, tabs, Unicode line and paragraph separators and the blank Braille pattern read as spaces.
_SPACES = re.compile(r"[\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029\u2800]")
# "<", ">" and the angle brackets that look like them become spaces; square brackets, parentheses.
_ANGLES = (
    "<>\u2329\u232a\u3008\u3009\u27e8\u27e9\u02c2\u02c3\u1438\u1433\u276c\u276d\u276e\u276f\u2770\u2771"
    "\u2991\u2992\u29fc\u29fd"
)
_BRACKETS = str.maketrans("[]" + _ANGLES, "()" + " " * len(_ANGLES))
# Letters that look like Latin ones (both cases; the skeleton is lowercased after this), and
# characters that look like ':' or '#'.
_LOOKALIKES = {
    "a": "аАαΑɑᴀ",
    "b": "ВΒʙ",
    "c": "сСᴄ",
    "d": "ԁᴅ",
    "e": "еЕεΕᴇ",
    "g": "ɡɢ",
    "h": "нНһҺΗʜհ",
    "i": "іІιΙıɪİӀ",
    "j": "јЈȷᴊ",
    "k": "кКκΚᴋ",
    "l": "ӏʟ",
    "m": "мМΜᴍ",
    "n": "ΝɴՈո",
    "o": "оОοΟᴏօ",
    "p": "рРρΡᴘ",
    "q": "ԛԚ",
    "r": "ʀ",
    "s": "ѕЅꜱ",
    "t": "тТτΤᴛ",
    "u": "υսᴜ",
    "v": "νᴠ",
    "w": "ԝԜᴡ",
    "x": "хХχΧ",
    "y": "уУγΥүҮʏ",
    "z": "Ζᴢ",
    ":": "ː꞉∶׃։",
    "#": "♯",
}
_FOLD = str.maketrans({look: plain for plain, looks in _LOOKALIKES.items() for look in looks})
_ROLES = "system|developer|assistant|user|human|gpt"
# On the skeleton. Each marker takes the separators after it, so removing it cannot join two
# leftovers into a new marker.
_ROLE_MARKER = re.compile(
    rf"(?<![a-z0-9])(?:{_ROLES})[\s|]*[:|][\s:|]*"  # user:  Assistant :  |system| (what <|system|> leaves)
    r"|#{2,}\s*\w+[\s:]*",  # ### Human:  ## Instruction
    re.IGNORECASE,
)
# Text shaped like a special token, e.g. <|im_end|>, </s>, [INST]: removed from captions, off task in a reply.
_TOKEN_SHAPE = re.compile(r"<[^<>\s]{1,64}>|\[/?[A-Z_]{3,}\]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    """``text`` as plain visible characters without token delimiters or role markers (see the module),
    whitespace collapsed, capped at ``max_chars``."""
    text = _TOKEN_SHAPE.sub(" ", _visible(text[: max_chars * SCAN_FACTOR])).translate(_BRACKETS)
    while spans := _role_spans(text):
        text = _blank(text, spans)
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[: cut.rfind(" ")] if " " in cut[max_chars // 2 :] else cut
    return text


def _visible(text: str) -> str:
    """``text`` with line breaks as spaces, without invisible characters, NFKC-normalised."""
    return unicodedata.normalize("NFKC", _invisible().sub("", _SPACES.sub(" ", text)))


def has_markers(text: str) -> bool:
    """Whether ``text`` holds something shaped like a special token, or a role marker in any spelling
    (a reply that does is off task)."""
    text = _visible(text)
    return _TOKEN_SHAPE.search(text) is not None or bool(_role_spans(text))


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a surrogate code point: a JSON escape such as ``\\ud800`` that is not
    Unicode text, which SQLite and Arrow refuse to store."""
    return _SURROGATE.search(text) is not None


def build_context(
    captions: list[str],
    boxes: Any,
    *,
    max_chars: int = 300,
    max_captions: int = 8,
    box_format: str = "xyxy_normalized",
    size: tuple[int | None, int | None] = (None, None),
) -> Context:
    """A :class:`Context` from a row's captions (in order, duplicates dropped) and raw boxes (all of
    them: a partial list would make every count wrong)."""
    seen, cleaned = set(), []
    for caption in captions:
        text = clean_text(caption or "", max_chars)
        if text and text.lower() not in seen:
            seen.add(text.lower())
            cleaned.append(text)
            if len(cleaned) == max_captions:
                break
    return Context(cleaned, parse_boxes(boxes, box_format, size))


def parse_boxes(
    raw: Any, box_format: str = "xyxy_normalized", size: tuple[int | None, int | None] = (None, None)
) -> list[Box]:
    """Boxes from a list of ``{"category", "bbox"}`` (or its JSON); anything else, or more than
    ``MAX_BOXES`` boxes or ``MAX_BOXES_JSON_CHARS`` characters of JSON, is a ValueError."""
    if raw is None or raw == "":
        return []
    items = _boxes_json(raw) if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ValueError(f"boxes must be a list of {{category, bbox}}, got {_short(items)}")
    if len(items) > MAX_BOXES:
        raise ValueError(f"{len(items):,} boxes, over the {MAX_BOXES:,} a row may have")
    return [_box(item, box_format, size) for item in items]


def _boxes_json(raw: str) -> Any:
    if len(raw) > MAX_BOXES_JSON_CHARS:
        raise ValueError(f"the boxes are {len(raw):,} characters of JSON, over {MAX_BOXES_JSON_CHARS:,}")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the boxes JSON nests too deeply") from None


def _box(item: Any, box_format: str, size: tuple[int | None, int | None]) -> Box:
    if not isinstance(item, dict):
        raise ValueError(f"a box must be an object with a category and a bbox, got {_short(item)}")
    category = clean_text(str(item.get("category") or ""), 40)
    bbox = item.get("bbox")
    if not category or not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise ValueError(f"a box needs a category and 4 coordinates, got {_short(item)}")
    try:
        bbox = [float(v) for v in bbox]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"box {_short(item)}: a coordinate is not a number") from None
    if box_format == "xywh_pixels":
        width, height = size
        if not width or not height:
            raise ValueError("xywh_pixels boxes need the row's original_width and original_height")
        x, y, w, h = bbox
        bbox = [x / width, y / height, (x + w) / width, (y + h) / height]
    bbox = [min(1.0, max(0.0, v)) for v in bbox]
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise ValueError(f"box {_short(item)}: x2 < x1 or y2 < y1")
    return Box(category, (bbox[0], bbox[1], bbox[2], bbox[3]))


@functools.cache
def _invisible() -> re.Pattern[str]:
    """One character class of every invisible code point (built once: a pass over all of Unicode)."""
    ranges = list(_IGNORABLE_RANGES)
    start = None
    for point in range(sys.maxunicode + 2):
        hidden = point <= sys.maxunicode and unicodedata.category(chr(point)) in _INVISIBLE_CATEGORIES
        if hidden and start is None:
            start = point
        elif not hidden and start is not None:
            ranges.append((start, point - 1))
            start = None
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]")


def _role_spans(text: str) -> list[tuple[int, int]]:
    """Where ``text`` holds role markers, found on its look-alike-folded skeleton."""
    if text.isascii():
        return [m.span() for m in _ROLE_MARKER.finditer(text)]
    kept = [i for i, c in enumerate(text) if not unicodedata.category(c).startswith("M")]  # marks are skipped
    skeleton = "".join(_skeleton_char(text[i]) for i in kept)
    return [(kept[m.start()], kept[m.end() - 1] + 1) for m in _ROLE_MARKER.finditer(skeleton)]


@functools.cache
def _skeleton_char(char: str) -> str:
    """The plain character ``char`` looks like: look-alikes folded, accents dropped, one character."""
    base = unicodedata.normalize("NFD", char.translate(_FOLD))[0].translate(_FOLD)
    lower = base.lower()
    return lower if len(lower) == 1 else base


def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each span replaced by a space."""
    parts, end = [], 0
    for start, stop in spans:
        parts += [text[end:start], " "]
        end = stop
    return "".join(parts) + text[end:]


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
