"""Captions for bigram mining, from any pool format or a text file."""

from __future__ import annotations

import polars as pl
import pytest

from curation.metaclip.caption_files import caption_texts


def test_each_format_gives_its_caption_strings(tmp_path):
    frame = pl.DataFrame({"URL": ["u1", "u2", "u3"], "TEXT": ["a cat", None, "a dog"]})
    frame.write_parquet(tmp_path / "p.parquet")
    frame.write_ndjson(tmp_path / "p.jsonl")
    frame.write_csv(tmp_path / "p.csv")
    frame.write_csv(tmp_path / "p.tsv", separator="\t")
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    for name in ("p.parquet", "p.jsonl", "p.csv", "p.tsv", "p.txt"):
        assert caption_texts(str(tmp_path / name)) == ["a cat", "a dog"], name


def test_a_named_column_and_the_errors_that_name_the_fix(tmp_path):
    path = tmp_path / "p.csv"
    pl.DataFrame({"url": ["u"], "words": ["a hat"]}).write_csv(path)
    assert caption_texts(str(path), "words") == ["a hat"]
    with pytest.raises(ValueError, match="--caption-column"):
        caption_texts(str(path))
    with pytest.raises(ValueError, match="'nope' is not in"):
        caption_texts(str(path), "nope")
    with pytest.raises(ValueError, match=r"\.parquet"):
        caption_texts(str(tmp_path / "p.xlsx"))
