"""The captions of a file, for mining bigrams: any pool format (parquet, csv, tsv, jsonl) or .txt."""

from __future__ import annotations

import polars as pl

from schemas.columns import CAPTION_CANDIDATES

_READERS = {
    ".parquet": pl.read_parquet,
    ".jsonl": pl.read_ndjson,
    ".json": pl.read_ndjson,
    ".csv": lambda path: pl.read_csv(path, infer_schema=False),
    ".tsv": lambda path: pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False),
}


def caption_texts(path: str, column: str = "auto") -> list[str]:
    """The non-empty caption strings of ``path``; ``column`` ``auto`` takes the first of the usual names."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in _READERS:
        raise ValueError(f"{path!r}: captions are read from {', '.join(sorted(_READERS))} or .txt files")
    frame = _READERS[suffix](path)
    if column == "auto":
        found = [name for name in CAPTION_CANDIDATES if name in frame.columns]
        if not found:
            raise ValueError(
                f"{path!r} has none of the usual caption columns {list(CAPTION_CANDIDATES)}; its columns are "
                f"{frame.columns}: name one with --caption-column"
            )
        column = found[0]
    elif column not in frame.columns:
        raise ValueError(f"caption column {column!r} is not in {path!r}; its columns are {frame.columns}")
    return [text for text in frame[column].to_list() if isinstance(text, str)]
