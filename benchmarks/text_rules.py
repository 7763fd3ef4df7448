"""Text rules: the project's vectorised stages against a per-row Python loop, same decisions.

Input: the real LAION-style alt-text in ../shared/data (10,000 captions) repeated to --rows.
Baseline: what a pandas/`apply` user writes: one Python function per caption with the `re`
module, the same rules, the same order, the same parameters. Ours: the three stages through
`pipelines.engine.chain.apply_stage` (contract checks, merging and reject records included). Both
must reject exactly the same rows for the same reasons, or the script fails.

    .venv/bin/python benchmarks/text_rules.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from curation.basic import (  # noqa: E402
    CONTROL_CHARACTERS,
    DEFAULT_GENERIC_CAPTIONS,
    IMAGE_EXTENSIONS,
    CaptionCharacters,
    CaptionLength,
    JunkAltText,
)
from pipelines.engine.chain import PlannedStage, ShardState, apply_stage  # noqa: E402
from schemas.columns import CAPTION, SOURCE_INDEX, UID  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alttext", "laion_style_10000.parquet")

# The same rules in Python's `re` (ASCII classes, as RE2's \w and \s are ASCII).
CONTROL = re.compile(CONTROL_CHARACTERS.replace("\\x{", "\\x").replace("}", "").replace("\\x00", "\\x00"))
FILENAME = re.compile(
    rf"\s*(?:[\w\-.()\[\]~+]+(?: [\w\-.()\[\]~+]+)*\.(?:{IMAGE_EXTENSIONS})"
    r"|(?:img|dsc[nf]?|pxl|dcim|image|photo|pic|screenshot|scan|untitled)[\s_\-]*\d+[\w\-]*)\s*",
    re.I | re.A,
)
DIMENSIONS = re.compile(r"\s*\d{1,5}\s*[x×*]\s*\d{1,5}\s*(?:px|pixels?)?\s*", re.I | re.A)
URL_ONLY = re.compile(r"\s*(?:https?://|www\.)\S+\s*", re.I | re.A)
GENERIC = frozenset(DEFAULT_GENERIC_CAPTIONS)


def baseline_reason(caption: str) -> str | None:
    if CONTROL.search(caption):
        return "control_characters"
    if "\ufffd" in caption:
        return "replacement_character"
    trimmed = caption.strip()
    if not trimmed:
        return "empty_caption"
    if FILENAME.fullmatch(caption):
        return "filename_caption"
    if DIMENSIONS.fullmatch(caption):
        return "dimensions_caption"
    if URL_ONLY.fullmatch(caption):
        return "url_caption"
    if trimmed.lower() in GENERIC:
        return "generic_caption"
    words, chars = len(trimmed.split()), len(trimmed)
    if words < 2:
        return "too_few_words"
    if chars < 5:
        return "too_short"
    if chars > 1000:
        return "too_long"
    return None


def load(rows: int) -> pa.Table:
    captions = pq.read_table(DATA, columns=["TEXT"])["TEXT"].combine_chunks()
    repeats = -(-rows // len(captions))
    caption = pa.concat_arrays([captions] * repeats).slice(0, rows)
    index = pa.array(range(rows), pa.int64())
    return pa.table({UID: pa.array([str(i) for i in range(rows)]), SOURCE_INDEX: index, CAPTION: caption})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if not os.path.exists(DATA):
        sys.exit(f"skipped: {DATA} not found (clone the project beside ../shared)")
    table = load(args.rows)
    table = table.filter(pa.compute.is_valid(table[CAPTION]))
    n = table.num_rows

    start = time.perf_counter()
    expected = [baseline_reason(c) for c in table[CAPTION].to_pylist()]
    baseline_s = time.perf_counter() - start

    stages = [PlannedStage(s.name, s) for s in (CaptionCharacters(), JunkAltText(), CaptionLength())]
    start = time.perf_counter()
    state = ShardState(shard=0, rows=table, rows_in=n)
    for planned in stages:
        state = apply_stage(planned, state)
    ours_s = time.perf_counter() - start

    rejects = state.rejects_table()
    got = [None] * n
    for index, reason in zip(rejects[SOURCE_INDEX].to_pylist(), rejects["reason"].to_pylist()):
        got[index] = reason
    mismatches = sum(a != b for a, b in zip(got, expected))
    if mismatches:
        sys.exit(f"FAILED: {mismatches} rows decided differently")
    rejected = sum(r is not None for r in expected)
    print(f"{n:,} captions, {rejected:,} rejected by both, identical reasons")
    print(f"baseline (per-row Python re loop): {baseline_s:.2f} s, {n / baseline_s:,.0f} rows/s")
    print(f"ours (vectorised stages, chain):    {ours_s:.2f} s, {n / ours_s:,.0f} rows/s")
    print(
        f"result: text_rules ours={n / ours_s:.0f} baseline={n / baseline_s:.0f} ratio={baseline_s / ours_s:.2f} rows/s"
    )


if __name__ == "__main__":
    main()
