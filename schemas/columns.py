"""Column names and types of a sample row: the one place where they are defined.

Every stage declares the columns it reads and the columns it writes by the names below; the
runner checks those declarations when a pipeline is built and checks the types of what a stage
returns against :data:`COLUMN_TYPES` at run time. A capability that adds a column registers it
here, next to its type and a one-line description.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from schemas.llava import FAILURE_TYPE, RECORD_TYPE

# Identity and provenance (written by the source when the pool is read).
UID = "uid"
SOURCE_INDEX = "source_index"
URL = "url"
CAPTION = "caption"
#: What public pools call these two columns (ours, LAION's ``URL``/``TEXT``, ...), in order of preference.
URL_CANDIDATES = ("url", "URL", "image_url", "img_url")
CAPTION_CANDIDATES = ("caption", "TEXT", "text", "alt_text", "alt", "title")

# Image, written by the download stage.
IMAGE = "image"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
SHA256 = "sha256"
SOURCE_SHA256 = "source_sha256"

# Curation signals.
METACLIP_ENTRIES = "metaclip_entries"
KEEP_PROBABILITY = "keep_probability"
CLIP_PIXELS = "clip_pixels"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
CLIP_SCORE = "clip_score"

# CapFilt (BLIP).
BLIP_PIXELS = "blip_pixels"
SYNTHETIC_CAPTIONS = "synthetic_captions"
CAPTION_SEED = "caption_seed"
CAPTION_SCORES = "caption_scores"
CAPTION_SOURCE = "caption_source"
WEB_CAPTION = "web_caption"
SELECTED_CAPTIONS = "selected_captions"
# Instruction generation
ABSENT_OBJECTS = "absent_objects"
INSTRUCTIONS = "instructions"
INSTRUCTION_FAILURES = "instruction_failures"
BRIEF_RECORDS = "brief_records"


@dataclass(frozen=True)
class Column:
    """A registered column: its name, Arrow type and meaning."""

    name: str
    type: pa.DataType
    description: str
    #: Heavy payloads (image bytes, embeddings) are not copied into reject files.
    heavy: bool = False
    #: Lives only inside a phase (a decoded image handed from a CPU stage to a model stage): it
    #: is never written to the run, so its reader must sit in the same phase as its writer.
    transient: bool = False
    #: A later stage's value multiplies the row's value instead of replacing it (probabilities
    #: that several stages weight a row by).
    multiplies: bool = False


_COLUMNS = (
    Column(UID, pa.string(), "stable id: the input's own uid, or a hash of url, caption and position"),
    Column(SOURCE_INDEX, pa.int64(), "0-based position of the row in the input, across all files"),
    Column(URL, pa.string(), "image URL as given in the input"),
    Column(CAPTION, pa.string(), "caption (alt-text) as given in the input, valid UTF-8"),
    Column(IMAGE, pa.binary(), "encoded image bytes", heavy=True),
    Column(WIDTH, pa.int32(), "width of the stored image in pixels"),
    Column(HEIGHT, pa.int32(), "height of the stored image in pixels"),
    Column(ORIGINAL_WIDTH, pa.int32(), "width of the image as downloaded"),
    Column(ORIGINAL_HEIGHT, pa.int32(), "height of the image as downloaded"),
    Column(SHA256, pa.string(), "hex sha256 of the stored image bytes"),
    Column(SOURCE_SHA256, pa.string(), "hex sha256 of the image bytes as downloaded (img2dataset's compute_hash)"),
    Column(METACLIP_ENTRIES, pa.list_(pa.int32()), "ids (metadata positions) of the MetaCLIP entries matched"),
    Column(
        KEEP_PROBABILITY,
        pa.float32(),
        "the chance that a training epoch uses the row (online balancing, match probability); the bundled "
        "trainers draw each epoch",
        multiplies=True,
    ),
    Column(
        CLIP_PIXELS,
        pa.binary(),
        "the image decoded, resized and cropped for a CLIP: uint8 HWC RGB",
        heavy=True,
        transient=True,
    ),
    Column(IMAGE_EMBEDDING, pa.list_(pa.float16()), "L2-normalised CLIP image embedding", heavy=True),
    Column(TEXT_EMBEDDING, pa.list_(pa.float16()), "L2-normalised CLIP embedding of the caption", heavy=True),
    Column(CLIP_SCORE, pa.float32(), "cosine of the image and caption embeddings (raw, in [-1, 1]; not x100)"),
    Column(
        BLIP_PIXELS,
        pa.binary(),
        "the image decoded and resized (square) for a BLIP: uint8 HWC RGB",
        heavy=True,
        transient=True,
    ),
    Column(SYNTHETIC_CAPTIONS, pa.list_(pa.string()), "captions a captioner wrote for the image"),
    Column(CAPTION_SEED, pa.int64(), "the sampling seed of the captioner's batch that wrote this row's captions"),
    Column(
        CAPTION_SCORES,
        pa.list_(pa.float32()),
        "score of each candidate caption (ITM probability or CLIP cosine): web caption first, then synthetic",
    ),
    Column(CAPTION_SOURCE, pa.string(), "where the selected caption came from: web or synthetic"),
    Column(WEB_CAPTION, pa.string(), "the caption the pool came with, kept when CapFilt selects another"),
    Column(SELECTED_CAPTIONS, pa.list_(pa.string()), "every candidate caption that passed the CapFilt filter"),
    Column(
        ABSENT_OBJECTS,
        pa.list_(pa.string()),
        "objects the row's boxes do not hold, for its presence questions, drawn as often as the pool holds them",
    ),
    Column(
        INSTRUCTIONS,
        pa.list_(RECORD_TYPE),
        "LLaVA instruction records (one per response type) with their model, prompt version and token usage",
    ),
    Column(
        INSTRUCTION_FAILURES,
        pa.list_(FAILURE_TYPE),
        "response types that produced no record for this row, with the reason (the row kept others)",
    ),
    Column(BRIEF_RECORDS, pa.list_(RECORD_TYPE), "stage-1 records: a brief-description instruction per caption"),
)

COLUMNS: dict[str, Column] = {c.name: c for c in _COLUMNS}
COLUMN_TYPES: dict[str, pa.DataType] = {c.name: c.type for c in _COLUMNS}

#: Columns every row has from the moment the pool is read.
BASE_COLUMNS = (UID, SOURCE_INDEX, URL, CAPTION)


def register_column(name: str, type: pa.DataType, description: str, *, heavy: bool = False) -> Column:
    """Register a column that a stage outside this package writes.

    Registering the same name again with the same type and weight is a no-op (modules are
    imported again in every worker); anything else is an error, because two stages would then
    disagree about what the column holds.
    """
    existing = COLUMNS.get(name)
    if existing is not None:
        if existing.type != type or existing.heavy != heavy:
            raise ValueError(
                f"column {name!r} is already registered as {existing.type} (heavy={existing.heavy}), "
                f"not {type} (heavy={heavy})"
            )
        return existing
    column = Column(name, type, description, heavy)
    COLUMNS[name] = column
    COLUMN_TYPES[name] = type
    return column


def column_type(name: str) -> pa.DataType:
    """The registered Arrow type of a column; a clear error for an unknown name."""
    try:
        return COLUMN_TYPES[name]
    except KeyError:
        raise ValueError(
            f"column {name!r} is not registered in schemas.columns; register it with "
            f"schemas.register_column before a stage declares it"
        ) from None


def is_heavy(name: str) -> bool:
    column = COLUMNS.get(name)
    return column is not None and column.heavy


def is_transient(name: str) -> bool:
    column = COLUMNS.get(name)
    return column is not None and column.transient


def multiplies(name: str) -> bool:
    column = COLUMNS.get(name)
    return column is not None and column.multiplies


def sample_schema(names: tuple[str, ...] | list[str] = BASE_COLUMNS) -> pa.Schema:
    """The Arrow schema of a row holding the named registered columns, in that order."""
    return pa.schema([pa.field(n, column_type(n)) for n in names])
