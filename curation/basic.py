"""Basic rules: cheap, vectorised filters on captions (before any download) and image sizes.

Each rule is its own stage so a config can order, drop or rename them, and each rejection names
its reason. Exact duplicates (of url and caption, or of image bytes by ``sha256``) are the
global stage in :mod:`curation.dedup`. Non-UTF-8 captions never reach these stages:
the source rejects them at read time (``caption_not_utf8``), because Arrow text columns hold
valid UTF-8 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.stage import Rejections, Resources, Stage, default_resources
from schemas.columns import CAPTION, ORIGINAL_HEIGHT, ORIGINAL_WIDTH

CONTROL_CHARACTERS = "control_characters"
REPLACEMENT_CHARACTER = "replacement_character"
EMPTY_CAPTION = "empty_caption"
FILENAME_CAPTION = "filename_caption"
DIMENSIONS_CAPTION = "dimensions_caption"
URL_CAPTION = "url_caption"
GENERIC_CAPTION = "generic_caption"
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"

#: Rows per call of the text rules: vectorised kernels amortise their per-call cost over large
#: batches (JunkAltText runs 2.4x faster at 65,536 rows than at 1,024).
TEXT_BATCH = 16384

# RE2 patterns (pyarrow.compute). C0 controls except tab, newline and carriage return; DEL; C1.
CONTROL_CHARACTERS = r"[\x{00}-\x{08}\x{0b}\x{0c}\x{0e}-\x{1f}\x{7f}-\x{9f}]"
_CONTROL_STRICT = r"[\x{00}-\x{1f}\x{7f}-\x{9f}]"
IMAGE_EXTENSIONS = r"jpe?g|png|gif|webp|bmp|tiff?|svg|heic|heif|avif|jfif|ico"
_JUNK_PATTERNS = {
    FILENAME_CAPTION: (
        rf"(?i)^\s*(?:[\w\-.()\[\]~+]+(?: [\w\-.()\[\]~+]+)*\.(?:{IMAGE_EXTENSIONS})"
        r"|(?:img|dsc[nf]?|pxl|dcim|image|photo|pic|screenshot|scan|untitled)[\s_\-]*\d+[\w\-]*)\s*$"
    ),
    DIMENSIONS_CAPTION: r"(?i)^\s*\d{1,5}\s*[x×*]\s*\d{1,5}\s*(?:px|pixels?)?\s*$",
    URL_CAPTION: r"(?i)^\s*(?:https?://|www\.)\S+\s*$",
}
DEFAULT_GENERIC_CAPTIONS = (
    "image",
    "images",
    "photo",
    "photos",
    "picture",
    "pic",
    "img",
    "untitled",
    "thumbnail",
    "thumb",
    "placeholder",
    "default",
    "logo",
    "icon",
    "banner",
    "null",
    "none",
    "n/a",
    "undefined",
    "no image",
    "image not found",
    "alt",
    "alt text",
    "spacer",
    "blank",
)


@dataclass
class CaptionCharacters(Stage):
    """Rejects captions holding control characters, or U+FFFD left by a lossy decode upstream.

    Tab, newline and carriage return are allowed unless ``allow_line_breaks`` is false (MetaCLIP
    treats them as spaces).
    """

    name: ClassVar[str] = "caption_characters"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)

    resources: Resources = default_resources(batch_size=TEXT_BATCH)
    allow_line_breaks: bool = True
    reject_replacement_character: bool = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        caption = batch[CAPTION]
        rejections = Rejections(batch.num_rows)
        pattern = CONTROL_CHARACTERS if self.allow_line_breaks else _CONTROL_STRICT
        rejections.add(
            pc.match_substring_regex(caption, pattern), CONTROL_CHARACTERS, "caption holds control characters"
        )
        if self.reject_replacement_character:  # a regex finds U+FFFD 3x faster than match_substring
            rejections.add(
                pc.match_substring_regex(caption, "\ufffd"),
                REPLACEMENT_CHARACTER,
                "caption holds U+FFFD (undecodable bytes upstream)",
            )
        return rejections.attach(batch.select([]))


@dataclass
class JunkAltText(Stage):
    """Rejects alt-text that describes nothing: empty, a file name, bare dimensions, a URL, a stock word.

    ``rules`` selects which of ``empty_caption``, ``filename_caption``, ``dimensions_caption``,
    ``url_caption``, ``generic_caption`` apply; ``generic_captions`` is the list of stock words
    compared case-insensitively after trimming.
    """

    name: ClassVar[str] = "junk_alt_text"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)
    RULES: ClassVar[tuple[str, ...]] = (
        EMPTY_CAPTION,
        FILENAME_CAPTION,
        DIMENSIONS_CAPTION,
        URL_CAPTION,
        GENERIC_CAPTION,
    )

    resources: Resources = default_resources(batch_size=TEXT_BATCH)
    rules: list[str] = field(default_factory=lambda: list(JunkAltText.RULES))
    generic_captions: list[str] = field(default_factory=lambda: list(DEFAULT_GENERIC_CAPTIONS))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rules) - set(self.RULES))
        if unknown:
            raise ValueError(f"rules: unknown rule(s) {unknown}; allowed: {list(self.RULES)}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        caption = batch[CAPTION]
        trimmed = pc.utf8_trim_whitespace(caption)
        rejections = Rejections(batch.num_rows)
        for rule in self.rules:
            if rule == EMPTY_CAPTION:
                rejections.add(pc.equal(pc.utf8_length(trimmed), 0), rule, "caption is empty or whitespace")
            elif rule == GENERIC_CAPTION:
                words = pa.array([w.lower() for w in self.generic_captions], pa.string())
                rejections.add(
                    pc.is_in(pc.utf8_lower(trimmed), value_set=words), rule, _quoted("stock caption: ", trimmed)
                )
            else:
                rejections.add(
                    pc.match_substring_regex(caption, _JUNK_PATTERNS[rule]),
                    rule,
                    _quoted(f"{rule.split('_')[0]}: ", caption),
                )
        return rejections.attach(batch.select([]))


@dataclass
class CaptionLength(Stage):
    """Rejects captions outside word and character bounds (``null`` disables a bound).

    Words are runs of non-whitespace (Unicode whitespace separates them); characters are the
    Unicode code points of the caption without its leading and trailing whitespace. The
    defaults drop one-word and shorter-than-five-character captions, a common floor for web
    alt-text; raise ``min_words`` to 3 for DataComp's "more than two words".
    """

    name: ClassVar[str] = "caption_length"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)

    resources: Resources = default_resources(batch_size=TEXT_BATCH)
    min_words: int | None = 2
    max_words: int | None = None
    min_chars: int | None = 5
    max_chars: int | None = 1000

    def __post_init__(self) -> None:
        for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
            a, b = getattr(self, low), getattr(self, high)
            for key, value in ((low, a), (high, b)):
                if value is not None and value < 0:
                    raise ValueError(f"{key} must be >= 0 or null, got {value}")
            if a is not None and b is not None and a > b:
                raise ValueError(f"{low} ({a}) is greater than {high} ({b})")

    def __call__(self, batch: pa.Table) -> pa.Table:
        trimmed = pc.utf8_trim_whitespace(batch[CAPTION])
        rejections = Rejections(batch.num_rows)
        if self.min_words is not None or self.max_words is not None:
            words = self._word_counts(trimmed)
            if self.min_words is not None:
                rejections.add(
                    pc.less(words, self.min_words), TOO_FEW_WORDS, _measured(words, f" < min_words={self.min_words}")
                )
            if self.max_words is not None:
                rejections.add(
                    pc.greater(words, self.max_words),
                    TOO_MANY_WORDS,
                    _measured(words, f" > max_words={self.max_words}"),
                )
        chars = pc.utf8_length(trimmed)
        if self.min_chars is not None:
            rejections.add(
                pc.less(chars, self.min_chars), TOO_SHORT, _measured(chars, f" < min_chars={self.min_chars}")
            )
        if self.max_chars is not None:
            rejections.add(
                pc.greater(chars, self.max_chars), TOO_LONG, _measured(chars, f" > max_chars={self.max_chars}")
            )
        return rejections.attach(batch.select([]))

    def _word_counts(self, trimmed) -> pa.Array:
        """Words per trimmed caption; without ``max_words``, counted only up to ``min_words``.

        Splitting stops after ``min_words - 1`` separators (exact below the minimum, which is all
        the rule and its detail need), 7x cheaper than a full split.
        """
        limit = None if self.max_words is not None else max(self.min_words - 1, 0)
        pieces = pc.list_value_length(pc.utf8_split_whitespace(trimmed, max_splits=limit))
        return pc.if_else(pc.equal(pc.utf8_length(trimmed), 0), 0, pieces)


def _measured(values: pa.Array, suffix: str):
    """A detail builder: ``"<value><suffix>"`` for the newly rejected rows only."""
    return lambda fresh: pc.binary_join_element_wise(pc.cast(pc.filter(values, fresh), pa.string()), suffix, "")


def _quoted(prefix: str, text: pa.Array):
    """A detail builder: ``"<prefix><text>"`` for the newly rejected rows only."""
    return lambda fresh: pc.binary_join_element_wise(prefix, pc.filter(text, fresh), "")


@dataclass
class ImageSize(Stage):
    """Rejects images whose smaller side is under ``min_side`` pixels or whose aspect ratio
    (longer side / shorter side) exceeds ``max_aspect_ratio``, measured as downloaded.

    LAION and DataComp drop very small images and extreme banners; the defaults (64 px, 3:1)
    keep everything a CLIP training crop can use. ``null`` disables a check.
    """

    name: ClassVar[str] = "image_size"
    input_columns: ClassVar[tuple[str, ...]] = (ORIGINAL_WIDTH, ORIGINAL_HEIGHT)

    resources: Resources = default_resources(batch_size=TEXT_BATCH)
    min_side: int | None = 64
    max_aspect_ratio: float | None = 3.0

    def __post_init__(self) -> None:
        if self.min_side is not None and self.min_side < 1:
            raise ValueError(f"min_side must be >= 1 or null, got {self.min_side}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1 or null, got {self.max_aspect_ratio}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        width, height = batch[ORIGINAL_WIDTH], batch[ORIGINAL_HEIGHT]
        short, long = pc.min_element_wise(width, height), pc.max_element_wise(width, height)
        size = pc.binary_join_element_wise(pc.cast(width, pa.string()), pc.cast(height, pa.string()), "x")
        rejections = Rejections(batch.num_rows)
        if self.min_side is not None:
            rejections.add(
                pc.less(short, self.min_side),
                TOO_SMALL,
                _quoted("", pc.binary_join_element_wise(size, f" < min_side={self.min_side}", "")),
            )
        if self.max_aspect_ratio is not None:
            ratio = pc.divide(pc.cast(long, pa.float64()), pc.cast(short, pa.float64()))
            rejections.add(
                pc.greater(ratio, self.max_aspect_ratio),
                BAD_ASPECT_RATIO,
                _quoted(
                    "", pc.binary_join_element_wise(size, f" exceeds max_aspect_ratio={self.max_aspect_ratio:g}", "")
                ),
            )
        return rejections.attach(batch.select([]))
