"""Tests of pipelines/source/shards.py: reading a url pool into shards, uids, and bad input."""

from __future__ import annotations

import csv
import gzip
import json
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xxhash

from pipelines.source.shards import (
    READ_STAGE,
    SourceError,
    SourceSpec,
    check_keep_columns,
    detect_format,
    probe_source,
    read_shards,
    resolve_files,
)
from schemas.columns import BASE_COLUMNS
from schemas.rejects import REJECT_SCHEMA
from tests.conftest import shared_path

GOOD = [
    ("http://a.test/1.jpg", "a red bicycle leaning on a wall"),
    ("http://a.test/2.jpg", "two dogs on a beach"),
    ("http://a.test/3.jpg", "a bowl of fresh fruit"),
]


# Helpers ---------------------------------------------------------------------------------------


def read_all(spec: SourceSpec, shard_size: int = 1000):
    """Every shard of ``spec``; checks the per-shard invariants; returns (shards, kept, rejects)."""
    shards = list(read_shards(spec, shard_size))
    for i, shard in enumerate(shards):
        assert shard.shard == i
        c = shard.counts
        # The ledger of the read stage closes: every input row is kept or rejected.
        assert c.closes, c
        assert c.rows_in == c.rows_kept + c.rows_rejected
        assert shard.rows.num_rows == c.rows_kept
        n_rejects = 0 if shard.rejects is None else shard.rejects.num_rows
        assert n_rejects == c.rows_rejected
        if shard.rejects is not None:
            got = {}
            for reason in shard.rejects["reason"].to_pylist():
                got[reason] = got.get(reason, 0) + 1
            assert got == c.rejected
            assert set(shard.rejects["stage"].to_pylist()) == {READ_STAGE}
            assert set(shard.rejects["shard"].to_pylist()) == {i}
            assert shard.rejects.schema.names[:5] == REJECT_SCHEMA.names
        # Kept rows start with the base columns, typed as registered, and hold no reject columns.
        assert shard.rows.column_names[:4] == list(BASE_COLUMNS)
        assert shard.rows.schema.field("uid").type == pa.string()
        assert shard.rows.schema.field("source_index").type == pa.int64()
        assert shard.rows.schema.field("url").type == pa.string()
        assert shard.rows.schema.field("caption").type == pa.string()
        assert "_reject_reason" not in shard.rows.column_names
    kept = pa.concat_tables([s.rows for s in shards]) if shards else None
    rejects = [s.rejects for s in shards if s.rejects is not None]
    rejects = pa.concat_tables(rejects, promote_options="permissive") if rejects else None
    # source_index covers every input row exactly once, across kept and rejected rows.
    indexes = kept["source_index"].to_pylist() + ([] if rejects is None else rejects["source_index"].to_pylist())
    assert sorted(indexes) == list(range(sum(s.counts.rows_in for s in shards)))
    return shards, kept, rejects


def write_csv(path: Path, rows, header=("url", "caption"), sep=",") -> Path:
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def reasons_by_index(rejects: pa.Table) -> dict[int, str]:
    return dict(zip(rejects["source_index"].to_pylist(), rejects["reason"].to_pylist()))


# Formats ---------------------------------------------------------------------------------------


def test_reads_parquet(tmp_path):
    path = write_parquet(tmp_path / "pool.parquet", {"url": [u for u, _ in GOOD], "caption": [c for _, c in GOOD]})
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert len(shards) == 1 and rejects is None
    assert kept["url"].to_pylist() == [u for u, _ in GOOD]
    assert kept["caption"].to_pylist() == [c for _, c in GOOD]
    assert kept["source_index"].to_pylist() == [0, 1, 2]
    assert kept.column_names == list(BASE_COLUMNS)


def test_reads_csv_with_quotes_and_embedded_newline(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text(
        'url,caption\nhttp://a.test/1.jpg,"a dog, a cat"\nhttp://a.test/2.jpg,"line one\nline two"\n'
        "http://a.test/3.jpg,plain words\n",
        encoding="utf-8",
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert rejects is None
    assert kept["caption"].to_pylist() == ["a dog, a cat", "line one\nline two", "plain words"]
    assert kept["url"].to_pylist() == ["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/3.jpg"]


def test_reads_tsv_without_quote_processing(tmp_path):
    path = write_csv(
        tmp_path / "pool.tsv", [("http://a.test/1.jpg", 'say "hi" there'), ("http://a.test/2.jpg", "b, c")], sep="\t"
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert rejects is None
    assert kept["caption"].to_pylist() == ['say "hi" there', "b, c"]


def test_reads_jsonl_and_skips_blank_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(
        json.dumps({"url": GOOD[0][0], "caption": GOOD[0][1]})
        + "\n\n   \n"
        + json.dumps({"url": GOOD[1][0], "caption": GOOD[1][1]})
        + "\n",
        encoding="utf-8",
    )
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert rejects is None
    assert shards[0].counts.rows_in == 2  # blank lines are not rows
    assert kept["url"].to_pylist() == [GOOD[0][0], GOOD[1][0]]
    assert kept["source_index"].to_pylist() == [0, 1]


def test_reads_gzipped_jsonl(tmp_path):
    path = tmp_path / "pool.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for url, caption in GOOD:
            f.write(json.dumps({"url": url, "caption": caption}) + "\n")
    _, kept, _ = read_all(SourceSpec(str(path)))
    assert kept["caption"].to_pylist() == [c for _, c in GOOD]


def test_explicit_format_overrides_extension(tmp_path):
    path = write_csv(tmp_path / "pool.txt", GOOD, sep="\t")
    with pytest.raises(SourceError, match="cannot tell the input format"):
        list(read_shards(SourceSpec(str(path)), 10))
    _, kept, _ = read_all(SourceSpec(str(path), format="tsv"))
    assert kept["url"].to_pylist() == [u for u, _ in GOOD]


def test_unknown_explicit_format_is_rejected(tmp_path):
    with pytest.raises(SourceError, match=r"input_format 'xml' is not one of: auto, parquet, csv, tsv, jsonl"):
        detect_format([str(tmp_path / "a.csv")], "xml")


# Files, folders, globs, shards -----------------------------------------------------------------


def _three_csv_files(folder: Path) -> list[list[tuple[str, str]]]:
    folder.mkdir(exist_ok=True)
    sizes = {"part-0.csv": 3, "part-1.csv": 4, "part-2.csv": 2}
    contents = []
    n = 0
    for name, size in sizes.items():
        rows = [(f"http://x.test/{n + i}.jpg", f"caption number {n + i}") for i in range(size)]
        n += size
        write_csv(folder / name, rows)
        contents.append(rows)
    return contents


def test_folder_reads_files_in_order_and_continues_source_index(tmp_path):
    contents = _three_csv_files(tmp_path / "pool")
    # Files the folder reader must ignore: hidden, underscore-prefixed, unknown extension.
    (tmp_path / "pool" / "_SUCCESS").write_text("")
    (tmp_path / "pool" / ".hidden.csv").write_text("url,caption\nhttp://hidden.test/,hidden row\n")
    (tmp_path / "pool" / "_meta.csv").write_text("url,caption\nhttp://meta.test/,meta row\n")
    (tmp_path / "pool" / "README.txt").write_text("not data")
    shards, kept, rejects = read_all(SourceSpec(str(tmp_path / "pool")), shard_size=4)
    expected = [r for rows in contents for r in rows]
    assert rejects is None
    assert kept["url"].to_pylist() == [u for u, _ in expected]
    assert kept["source_index"].to_pylist() == list(range(9))
    # Shards are cut every 4 input rows, in input order, across file boundaries.
    assert [s.counts.rows_in for s in shards] == [4, 4, 1]
    assert [s.rows["source_index"].to_pylist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    # The first row of the second file is input row 3.
    assert kept.filter(pc.equal(kept["url"], contents[1][0][0]))["source_index"].to_pylist() == [3]


def test_glob_reads_only_matching_files(tmp_path):
    contents = _three_csv_files(tmp_path)
    write_csv(tmp_path / "other.csv", [("http://other.test/", "not in the glob")])
    shards, kept, _ = read_all(SourceSpec(str(tmp_path / "part-*.csv")), shard_size=2)
    assert kept["url"].to_pylist() == [u for rows in contents for u, _ in rows]
    assert [s.counts.rows_in for s in shards] == [2, 2, 2, 2, 1]
    assert resolve_files(str(tmp_path / "part-*.csv")) == [str(tmp_path / f"part-{i}.csv") for i in range(3)]


def test_exact_multiple_of_shard_size_gives_no_empty_shard(tmp_path):
    rows = [(f"http://x.test/{i}", f"caption {i}") for i in range(6)]
    path = write_csv(tmp_path / "pool.csv", rows)
    shards, _, _ = read_all(SourceSpec(str(path)), shard_size=3)
    assert [s.counts.rows_in for s in shards] == [3, 3]


def test_shard_size_larger_than_pool_gives_one_shard(tmp_path):
    path = write_csv(tmp_path / "pool.csv", GOOD)
    shards, _, _ = read_all(SourceSpec(str(path)), shard_size=10_000)
    assert len(shards) == 1 and shards[0].counts.rows_in == 3


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(SourceError, match=r"input glob .*\*\.csv' matches no file"):
        resolve_files(str(tmp_path / "*.csv"))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "README.txt").write_text("x")
    with pytest.raises(SourceError, match=r"holds no \.parquet, \.csv, \.tsv or \.jsonl file"):
        list(read_shards(SourceSpec(str(tmp_path)), 10))


def test_folder_with_mixed_formats(tmp_path):
    write_csv(tmp_path / "a.csv", GOOD)
    write_jsonl(tmp_path / "b.jsonl", [{"url": "http://b.test/", "caption": "b b"}])
    with pytest.raises(SourceError, match="all input files must share one format"):
        list(read_shards(SourceSpec(str(tmp_path)), 10))


# Column detection ------------------------------------------------------------------------------


def test_auto_detects_laion_columns_in_parquet(tmp_path):
    path = write_parquet(
        tmp_path / "laion.parquet",
        {
            "SAMPLE_ID": [1, 2],
            "URL": ["http://l.test/1", "http://l.test/2"],
            "TEXT": ["laion one", "laion two"],
            "similarity": [0.3, 0.4],
        },
    )
    _, kept, _ = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://l.test/1", "http://l.test/2"]
    assert kept["caption"].to_pylist() == ["laion one", "laion two"]
    # Columns that are not asked for are not carried.
    assert kept.column_names == list(BASE_COLUMNS)


def test_auto_detects_laion_columns_in_csv_and_jsonl(tmp_path):
    csv = write_csv(tmp_path / "laion.csv", [("http://l.test/1", "laion one")], header=("URL", "TEXT"))
    jsonl = write_jsonl(tmp_path / "laion.jsonl", [{"TEXT": "laion two", "URL": "http://l.test/2"}])
    _, kept_csv, _ = read_all(SourceSpec(str(csv)))
    _, kept_json, _ = read_all(SourceSpec(str(jsonl)))
    assert kept_csv.select(["url", "caption"]).to_pylist() == [{"url": "http://l.test/1", "caption": "laion one"}]
    assert kept_json.select(["url", "caption"]).to_pylist() == [{"url": "http://l.test/2", "caption": "laion two"}]


def test_auto_detection_prefers_earlier_candidates(tmp_path):
    # ``url`` wins over ``image_url``, ``caption`` over ``TEXT`` and ``title``.
    path = write_parquet(
        tmp_path / "p.parquet",
        {
            "image_url": ["http://img.test/"],
            "url": ["http://page.test/"],
            "title": ["the title"],
            "TEXT": ["laion text"],
            "caption": ["the caption"],
        },
    )
    _, kept, _ = read_all(SourceSpec(str(path)))
    assert kept.select(["url", "caption"]).to_pylist() == [{"url": "http://page.test/", "caption": "the caption"}]


def test_explicit_columns(tmp_path):
    path = write_csv(
        tmp_path / "p.csv",
        [("http://page.test/", "http://img.test/", "alt words", "the title")],
        header=("url", "img_src", "alt", "title"),
    )
    _, kept, _ = read_all(SourceSpec(str(path), url_column="img_src", caption_column="title"))
    assert kept.select(["url", "caption"]).to_pylist() == [{"url": "http://img.test/", "caption": "the title"}]


def test_auto_detection_failure_lists_candidates_and_columns(tmp_path):
    path = write_csv(tmp_path / "p.csv", [("http://a.test/", "words")], header=("link", "caption"))
    with pytest.raises(SourceError) as info:
        list(read_shards(SourceSpec(str(path)), 10))
    message = str(info.value)
    assert "columns.url: no column of" in message
    assert "looked for url, URL, image_url, img_url" in message
    assert "['link', 'caption']" in message
    assert "columns.url" in message


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_misnamed_explicit_column_names_it_and_lists_columns(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    if fmt == "parquet":
        write_parquet(path, {"url": ["http://a.test/"], "caption": ["words here"]})
    elif fmt == "jsonl":
        write_jsonl(path, [{"url": "http://a.test/", "caption": "words here"}])
    else:
        write_csv(path, [("http://a.test/", "words here")], sep="," if fmt == "csv" else "\t")
    with pytest.raises(SourceError, match=re.escape("columns.caption: column 'capton' is not in")) as info:
        list(read_shards(SourceSpec(str(path), caption_column="capton"), 10))
    assert "its columns are ['url', 'caption']" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_keep_or_uid_column_is_named(tmp_path):
    path = write_csv(tmp_path / "p.csv", [("http://a.test/", "words here")])
    with pytest.raises(SourceError, match=r"column 'width' is not in .*its columns are \['url', 'caption'\]"):
        list(read_shards(SourceSpec(str(path), keep_columns=("width",)), 10))
    with pytest.raises(SourceError, match=r"column 'key' is not in .*its columns are \['url', 'caption'\]"):
        list(read_shards(SourceSpec(str(path), uid_column="key"), 10))


# uids ------------------------------------------------------------------------------------------


def test_uids_are_stable_unique_and_independent_of_sharding(tmp_path):
    rows = [(f"http://x.test/{i % 3}", f"same caption {i % 3}") for i in range(9)]  # duplicates on purpose
    path = write_csv(tmp_path / "pool.csv", rows)
    _, first, _ = read_all(SourceSpec(str(path)), shard_size=100)
    _, second, _ = read_all(SourceSpec(str(path)), shard_size=100)
    _, resharded, _ = read_all(SourceSpec(str(path)), shard_size=2)
    uids = first["uid"].to_pylist()
    assert uids == second["uid"].to_pylist() == resharded["uid"].to_pylist()
    assert len(set(uids)) == len(uids) == 9  # identical rows still get distinct uids
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)


def test_uid_is_the_xxh3_128_of_position_url_and_caption(tmp_path):
    path = write_csv(
        tmp_path / "pool.csv", [("http://x.test/0", "first caption"), ("http://x.test/1", "ünïcode caption")]
    )
    _, kept, _ = read_all(SourceSpec(str(path)))
    assert kept["uid"].to_pylist() == [
        xxhash.xxh3_128_hexdigest(b"0\x1fhttp://x.test/0\x1ffirst caption"),
        xxhash.xxh3_128_hexdigest("1\x1fhttp://x.test/1\x1fünïcode caption".encode()),
    ]


def test_uid_depends_on_content(tmp_path):
    a = write_csv(tmp_path / "a.csv", [("http://x.test/1", "one caption")])
    b = write_csv(tmp_path / "b.csv", [("http://x.test/1", "another caption")])
    _, kept_a, _ = read_all(SourceSpec(str(a)))
    _, kept_b, _ = read_all(SourceSpec(str(b)))
    assert kept_a["uid"].to_pylist() != kept_b["uid"].to_pylist()


def test_same_rows_give_same_uids_across_formats(tmp_path):
    csv = write_csv(tmp_path / "p.csv", GOOD)
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"url": u, "caption": c} for u, c in GOOD])
    parquet = write_parquet(tmp_path / "p.parquet", {"url": [u for u, _ in GOOD], "caption": [c for _, c in GOOD]})
    uids = [read_all(SourceSpec(str(p)))[1]["uid"].to_pylist() for p in (csv, jsonl, parquet)]
    assert uids[0] == uids[1] == uids[2]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_user_uid_column_is_used_as_is(tmp_path, fmt):
    ids = ["id-b", "0042", "zz"]
    path = tmp_path / f"p.{fmt}"
    if fmt == "csv":
        write_csv(path, [(i, u, c) for i, (u, c) in zip(ids, GOOD)], header=("key", "url", "caption"))
    elif fmt == "parquet":
        write_parquet(path, {"key": ids, "url": [u for u, _ in GOOD], "caption": [c for _, c in GOOD]})
    else:
        write_jsonl(path, [{"key": i, "url": u, "caption": c} for i, (u, c) in zip(ids, GOOD)])
    _, kept, _ = read_all(SourceSpec(str(path), uid_column="key"))
    assert kept["uid"].to_pylist() == ids  # "0042" keeps its leading zeros: not parsed as a number
    assert "key" not in kept.column_names


def test_integer_uid_column_becomes_text(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet",
        {"id": pa.array([7, 8], pa.int64()), "url": ["http://a.test/", "http://b.test/"], "caption": ["a a", "b b"]},
    )
    _, kept, _ = read_all(SourceSpec(str(path), uid_column="id"))
    assert kept["uid"].to_pylist() == ["7", "8"]


def test_empty_user_uid_is_rejected(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet", {"id": ["u1", "", "u3"], "url": [u for u, _ in GOOD], "caption": [c for _, c in GOOD]}
    )
    _, kept, rejects = read_all(SourceSpec(str(path), uid_column="id"))
    assert kept["uid"].to_pylist() == ["u1", "u3"]
    assert reasons_by_index(rejects) == {1: "missing_uid"}
    assert rejects["detail"].to_pylist() == ["no value in column 'id'"]


def test_null_user_uid_is_rejected(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet", {"id": ["u1", None, "u3"], "url": [u for u, _ in GOOD], "caption": [c for _, c in GOOD]}
    )
    _, kept, rejects = read_all(SourceSpec(str(path), uid_column="id"))
    assert kept["uid"].to_pylist() == ["u1", "u3"]
    assert reasons_by_index(rejects) == {1: "missing_uid"}
    # The rejected row still gets an identifier of its own.
    assert rejects["uid"].to_pylist()[0] not in (None, "", "u1", "u3")


def test_rows_with_empty_user_uid_get_distinct_reject_uids(tmp_path):
    path = write_csv(
        tmp_path / "p.csv", [("u1", *GOOD[0]), ("", *GOOD[1]), ("", *GOOD[2])], header=("key", "url", "caption")
    )
    _, kept, rejects = read_all(SourceSpec(str(path), uid_column="key"))
    assert kept["uid"].to_pylist() == ["u1"]
    assert rejects["reason"].to_pylist() == ["missing_uid", "missing_uid"]
    reject_uids = rejects["uid"].to_pylist()
    assert "" not in reject_uids
    assert len(set(reject_uids)) == 2


# keep_columns ----------------------------------------------------------------------------------


def test_keep_columns_carried_through_parquet_with_types(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet",
        {
            "URL": [u for u, _ in GOOD],
            "TEXT": [c for _, c in GOOD],
            "similarity": pa.array([0.1, 0.2, 0.3], pa.float64()),
            "WIDTH": pa.array([10, 20, 30], pa.int32()),
            "dropped": ["x", "y", "z"],
        },
    )
    _, kept, _ = read_all(SourceSpec(str(path), keep_columns=("similarity", "WIDTH")))
    assert kept.column_names == [*BASE_COLUMNS, "similarity", "WIDTH"]
    assert kept["similarity"].to_pylist() == [0.1, 0.2, 0.3]
    assert kept.schema.field("WIDTH").type == pa.int32()
    assert kept["WIDTH"].to_pylist() == [10, 20, 30]


def test_keep_columns_carried_through_csv_and_jsonl(tmp_path):
    csv = write_csv(
        tmp_path / "p.csv",
        [("http://a.test/", "a a", "p1"), ("http://b.test/", "b b", "p2")],
        header=("url", "caption", "page"),
    )
    jsonl = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"url": "http://a.test/", "caption": "a a", "meta": {"w": 1}},
            {"url": "http://b.test/", "caption": "b b", "meta": {"w": 2}},
        ],
    )
    _, kept_csv, _ = read_all(SourceSpec(str(csv), keep_columns=("page",)))
    _, kept_json, _ = read_all(SourceSpec(str(jsonl), keep_columns=("meta",)))
    assert kept_csv["page"].to_pylist() == ["p1", "p2"]
    assert kept_json["meta"].to_pylist() == ['{"w": 1}', '{"w": 2}']  # kept JSON values are JSON text


def test_keep_column_with_mixed_json_types_is_json_text(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"url": "http://a.test/", "caption": "a a", "extra": 1},
            {"url": "http://b.test/", "caption": "b b", "extra": "two"},
            {"url": "http://c.test/", "caption": "c c", "extra": [3]},
        ],
    )
    _, kept, _ = read_all(SourceSpec(str(path), keep_columns=("extra",)))
    assert kept["extra"].to_pylist() == ["1", "two", "[3]"]  # strings as they are, other values as JSON


def test_keep_columns_appear_in_reject_records(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet",
        {"url": ["http://a.test/", "http://b.test/"], "caption": ["a a", None], "page": ["p1", "p2"]},
    )
    _, kept, rejects = read_all(SourceSpec(str(path), keep_columns=("page",)))
    assert kept["page"].to_pylist() == ["p1"]
    assert rejects.select(["reason", "url", "page"]).to_pylist() == [
        {"reason": "missing_caption", "url": "http://b.test/", "page": "p2"}
    ]


def test_keep_columns_must_not_clash_with_reserved_names():
    check_keep_columns(("similarity", "page"))
    for name in ("url", "uid", "source_index", "caption", "reason", "_reject_reason", "image"):
        with pytest.raises(SourceError, match=re.escape(f"reserved column(s) ['{name}']")):
            check_keep_columns(("similarity", name))


def test_keep_column_types_may_differ_between_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"url": "http://a.test/", "caption": "a a", "page": None}])
    write_jsonl(tmp_path / "b.jsonl", [{"url": "http://b.test/", "caption": "b b", "page": "p2"}])
    _, kept, _ = read_all(SourceSpec(str(tmp_path), keep_columns=("page",)))
    assert kept["page"].to_pylist() == [None, "p2"]


# Whole-file problems ---------------------------------------------------------------------------


def test_missing_input_file(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(SourceError, match=re.escape(f"input file {str(path)!r} does not exist")):
        list(read_shards(SourceSpec(str(path)), 10))


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_an_input_uri_reads_as_the_plain_path(tmp_path, scheme):
    import fsspec

    path = write_csv(tmp_path / "pool.csv", GOOD)
    uri = f"file://{path}"
    if scheme == "memory":  # through fsspec (s3:// is tested against moto's server in test_uri_inputs.py)
        uri = f"memory://vlmc-{uuid.uuid4().hex}/pool.csv"
        fsspec.filesystem("memory").pipe(uri, open(path, "rb").read())
    probe_source(SourceSpec(uri))
    shards = [(s.rows.to_pylist(), s.counts) for s in read_shards(SourceSpec(uri), 10)]
    assert shards == [(s.rows.to_pylist(), s.counts) for s in read_shards(SourceSpec(str(path)), 10)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(SourceError, match=re.escape(f"input file {str(path)!r} is empty")):
        list(read_shards(SourceSpec(str(path)), 10))


def test_empty_file_among_others_fails_the_read(tmp_path):
    write_csv(tmp_path / "a.csv", GOOD)
    (tmp_path / "b.csv").write_bytes(b"")
    with pytest.raises(SourceError, match=r"b\.csv' is empty"):
        list(read_shards(SourceSpec(str(tmp_path)), 10))


@pytest.mark.parametrize("kind", ["csv_header_only", "parquet_zero_rows", "jsonl_blank_lines"])
def test_file_without_rows(tmp_path, kind):
    if kind == "csv_header_only":
        path = tmp_path / "p.csv"
        path.write_text("url,caption\n")
    elif kind == "parquet_zero_rows":
        path = write_parquet(
            tmp_path / "p.parquet", {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}
        )
    else:
        path = tmp_path / "p.jsonl"
        path.write_text("\n\n  \n")
    with pytest.raises(SourceError, match=re.escape(f"input {str(path)!r} holds no rows")):
        list(read_shards(SourceSpec(str(path)), 10))


def test_csv_without_header_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("\n")
    with pytest.raises(SourceError, match=r"p\.csv' cannot be parsed as csv"):
        list(read_shards(SourceSpec(str(path)), 10))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text("this is not parquet at all")
    with pytest.raises(SourceError, match=r"p\.parquet' is not a readable parquet file"):
        list(read_shards(SourceSpec(str(path)), 10))


@pytest.mark.parametrize("column", ["caption", "url"])
def test_parquet_column_that_is_not_text(tmp_path, column):
    values = {"url": ["http://a.test/", "http://b.test/"], "caption": ["a a", "b b"]}
    values[column] = pa.array([1, 2], pa.int64())
    path = write_parquet(tmp_path / "p.parquet", values)
    with pytest.raises(SourceError, match=rf"column '{column}' of .* has type int64; it must hold text"):
        list(read_shards(SourceSpec(str(path)), 10))


@pytest.mark.parametrize("text_type", [pa.large_string(), pa.binary(), pa.large_binary(), pa.string_view()])
def test_parquet_text_types_are_accepted(tmp_path, text_type):
    path = write_parquet(
        tmp_path / "p.parquet",
        {
            "url": pa.array(["http://a.test/", "http://b.test/"]).cast(text_type),
            "caption": pa.array(["a a", None]).cast(text_type),
        },
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept.select(["url", "caption"]).to_pylist() == [{"url": "http://a.test/", "caption": "a a"}]
    assert reasons_by_index(rejects) == {1: "missing_caption"}


def test_parquet_all_null_caption_column_rejects_every_row(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"url": ["http://a.test/", "http://b.test/"], "caption": pa.nulls(2)})
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept.num_rows == 0
    assert shards[0].counts.rejected == {"missing_caption": 2}


def test_parquet_dictionary_encoded_caption_is_text(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet",
        {"url": ["http://a.test/", "http://b.test/"], "caption": pa.array(["a cat", "a cat"]).dictionary_encode()},
    )
    _, kept, _ = read_all(SourceSpec(str(path)))
    assert kept["caption"].to_pylist() == ["a cat", "a cat"]


# Row-level problems ----------------------------------------------------------------------------


def test_csv_malformed_row_is_rejected_and_others_kept(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        "url,caption\nhttp://a.test/,one two\nhttp://b.test/,x,y\nhttp://c.test/,three four\nhttp://d.test/\n"
    )
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert shards[0].counts.rows_in == 4
    assert shards[0].counts.rejected == {"malformed_row": 2}
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/"]
    details = sorted(rejects["detail"].to_pylist())
    assert details[0].startswith("csv line 3: expected 2 columns, got 3") and "'http://b.test/,x,y'" in details[0]
    assert details[1].startswith("csv line 5: expected 2 columns, got 1") and "'http://d.test/'" in details[1]
    assert rejects["url"].to_pylist() == [None, None]
    assert len(set(rejects["uid"].to_pylist())) == 2  # the detail makes their uids distinct


def test_tsv_malformed_row(tmp_path):
    path = write_csv(tmp_path / "p.tsv", [("http://a.test/", "a a"), ("http://b.test/", "b b", "extra")], sep="\t")
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/"]
    assert rejects["reason"].to_pylist() == ["malformed_row"]
    assert rejects["detail"][0].as_py().startswith("tsv line 3: expected 2 columns, got 3")


def test_csv_of_only_malformed_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("url,caption\na,b,c\nd,e,f\n")
    shards, kept, _ = read_all(SourceSpec(str(path)))
    assert kept.num_rows == 0
    assert shards[0].counts.rejected == {"malformed_row": 2}


def test_csv_malformed_row_keeps_its_input_position(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("url,caption\nhttp://a.test/,one two\nhttp://b.test/,x,y\nhttp://c.test/,three four\n")
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert dict(zip(kept["url"].to_pylist(), kept["source_index"].to_pylist())) == {
        "http://a.test/": 0,
        "http://c.test/": 2,
    }
    assert rejects["source_index"].to_pylist() == [1]


def test_csv_empty_url_is_missing_url(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("url,caption\n,no url here\nhttp://b.test/,b b\n")
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://b.test/"]
    assert reasons_by_index(rejects) == {0: "missing_url"}
    assert rejects["detail"].to_pylist() == ["no value in column 'url'"]


def test_csv_invalid_utf8_caption(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(
        b"url,caption\nhttp://a.test/,fine words\nhttp://b.test/,bad \xff\xfe bytes\nhttp://c.test/,more words\n"
    )
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/"]
    assert reasons_by_index(rejects) == {1: "caption_not_utf8"}
    assert rejects["detail"].to_pylist() == ["'caption' is not valid UTF-8"]
    assert rejects["url"].to_pylist() == ["http://b.test/"]  # the url is still recorded for the reject
    assert rejects["caption"].to_pylist() == [None]


def test_csv_invalid_utf8_url(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"url,caption\nhttp://a.test/\xc3(,fine words\nhttp://c.test/,more words\n")
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://c.test/"]
    assert reasons_by_index(rejects) == {0: "url_not_utf8"}


@pytest.mark.parametrize("as_string", [False, True], ids=["binary", "string_view_of_bytes"])
def test_parquet_invalid_utf8_caption(tmp_path, as_string):
    caption = pa.array([b"good caption", b"bad \xff bytes", None], pa.binary())
    if as_string:
        caption = caption.view(pa.string())  # parquet does not validate UTF-8 on write or read
    path = write_parquet(
        tmp_path / "p.parquet", {"url": ["http://a.test/", "http://b.test/", "http://c.test/"], "caption": caption}
    )
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept.select(["url", "caption"]).to_pylist() == [{"url": "http://a.test/", "caption": "good caption"}]
    assert reasons_by_index(rejects) == {1: "caption_not_utf8", 2: "missing_caption"}
    assert shards[0].counts.rejected == {"caption_not_utf8": 1, "missing_caption": 1}


def test_parquet_empty_url_and_null_caption(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet",
        {
            "url": ["http://a.test/", "", "http://c.test/", ""],
            "caption": ["a a", "b b", None, None],
        },
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/"]
    # A row with both problems is rejected once, for the first checked (the url).
    assert reasons_by_index(rejects) == {1: "missing_url", 2: "missing_caption", 3: "missing_url"}
    details = dict(zip(rejects["source_index"].to_pylist(), rejects["detail"].to_pylist()))
    assert details == {1: "no value in column 'url'", 2: "no value in column 'caption'", 3: "no value in column 'url'"}


def test_parquet_null_url_is_missing_url(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"URL": ["http://a.test/", None, None], "TEXT": ["a a", "b b", None]})
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/"]
    assert reasons_by_index(rejects) == {1: "missing_url", 2: "missing_url"}
    assert rejects["detail"].to_pylist() == ["no value in column 'URL'"] * 2


def test_parquet_reject_details_name_the_input_column(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"URL": ["", "http://b.test/"], "TEXT": ["a a", None]})
    _, _, rejects = read_all(SourceSpec(str(path)))
    assert rejects["detail"].to_pylist() == ["no value in column 'URL'", "no value in column 'TEXT'"]


def test_jsonl_bad_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"url": "http://a.test/", "caption": "good one"},  # 0 kept
            "this is not json",  # 1 malformed_row
            "[1, 2, 3]",  # 2 malformed_row (array)
            '{"url": "http://d.test/", "caption": "truncated',  # 3 malformed_row
            {"url": "http://e.test/", "caption": 42},  # 4 caption_not_text
            {"url": "http://f.test/", "caption": ["a", "list"]},  # 5 caption_not_text
            {"url": None, "caption": "null url"},  # 6 missing_url
            {"caption": "no url key"},  # 7 missing_url
            {"url": "", "caption": "empty url"},  # 8 missing_url
            {"url": "http://j.test/", "caption": None},  # 9 missing_caption
            {"url": 17, "caption": "numeric url"},  # 10 url_not_text
            '{"url": "http://l.test/", "caption": "lone \\ud800 surrogate"}',  # 11 caption_not_utf8
            {"url": "http://m.test/", "caption": "good two"},  # 12 kept
        ],
    )
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/", "http://m.test/"]
    assert kept["source_index"].to_pylist() == [0, 12]
    assert reasons_by_index(rejects) == {
        1: "malformed_row",
        2: "malformed_row",
        3: "malformed_row",
        4: "caption_not_text",
        5: "caption_not_text",
        6: "missing_url",
        7: "missing_url",
        8: "missing_url",
        9: "missing_caption",
        10: "url_not_text",
        11: "caption_not_utf8",
    }
    details = dict(zip(rejects["source_index"].to_pylist(), rejects["detail"].to_pylist()))
    assert details[1].startswith("line 2: ") and "this is not json" in details[1]
    assert details[2].startswith("line 3: a JSON list, not an object")
    assert details[4] == "'caption' holds a JSON int"
    assert details[5] == "'caption' holds a JSON list"
    assert details[10] == "'url' holds a JSON int"
    assert shards[0].counts.rows_in == 13


def test_jsonl_invalid_utf8_line_is_malformed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"url": "http://a.test/", "caption": "ok ok"}\n{"url": "http://b.test/", "caption": "bad \xff"}\n'
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/"]
    assert reasons_by_index(rejects) == {1: "malformed_row"}
    assert rejects["detail"][0].as_py().startswith("line 2: ")


def test_jsonl_missing_user_uid(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "k1", "url": "http://a.test/", "caption": "a a"},
            {"id": "", "url": "http://b.test/", "caption": "b b"},
            {"id": None, "url": "http://c.test/", "caption": "c c"},
        ],
    )
    _, kept, rejects = read_all(SourceSpec(str(path), uid_column="id"))
    assert kept["uid"].to_pylist() == ["k1"]
    assert reasons_by_index(rejects) == {1: "missing_uid", 2: "missing_uid"}
    assert len(set(rejects["uid"].to_pylist())) == 2


def test_jsonl_first_record_without_caption_key_is_a_row_reject(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"url": "http://a.test/"}, {"url": "http://b.test/", "caption": "b b"}])
    _, kept, rejects = read_all(SourceSpec(str(path), url_column="url", caption_column="caption"))
    assert kept["url"].to_pylist() == ["http://b.test/"]
    assert reasons_by_index(rejects) == {0: "missing_caption"}


def test_counts_close_for_every_shard_of_a_messy_pool(tmp_path):
    lines = ["url,caption"]
    expected = {"malformed_row": 0, "missing_url": 0}
    for i in range(50):
        if i % 7 == 3:
            lines.append(f"http://x.test/{i},too,many")
            expected["malformed_row"] += 1
        elif i % 11 == 5:
            lines.append(f",caption {i}")
            expected["missing_url"] += 1
        else:
            lines.append(f"http://x.test/{i},caption {i}")
    path = tmp_path / "p.csv"
    path.write_text("\n".join(lines) + "\n")
    shards, kept, rejects = read_all(SourceSpec(str(path)), shard_size=8)
    assert [s.counts.rows_in for s in shards] == [8] * 6 + [2]
    total = {}
    for s in shards:
        for reason, n in s.counts.rejected.items():
            total[reason] = total.get(reason, 0) + n
    assert total == expected
    assert kept.num_rows == 50 - sum(expected.values())
    assert len(set(kept["uid"].to_pylist()) | set(rejects["uid"].to_pylist())) == 50


# Hostile rows and damaged files: a bad row costs only that row --------------------------------


@pytest.mark.parametrize(
    "deep", ["[" * 100_000, '{"url": "http://b.test/", "caption": ' + "[" * 100_000], ids=["array", "inside_an_object"]
)
def test_jsonl_line_nested_too_deeply_is_malformed(tmp_path, deep):
    # The first line is also the first one the key probe meets.
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [deep, {"url": "http://a.test/", "caption": "a a"}, deep, {"url": "http://c.test/", "caption": "c c"}],
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/"]
    assert reasons_by_index(rejects) == {0: "malformed_row", 2: "malformed_row"}
    details = rejects["detail"].to_pylist()
    assert details[0].startswith("line 1: JSON nested too deeply: ") and details[1].startswith("line 3: ")


def test_jsonl_line_longer_than_max_row_bytes_is_malformed(tmp_path):
    long = json.dumps({"url": "http://b.test/", "caption": "x" * 5000})
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"url": "http://a.test/", "caption": "a a"}, long, {"url": "http://c.test/", "caption": "c c"}],
    )
    _, kept, rejects = read_all(SourceSpec(str(path), max_row_bytes=1000))
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/"]
    assert reasons_by_index(rejects) == {1: "malformed_row"}
    assert (
        rejects["detail"][0]
        .as_py()
        .startswith('line 2: longer than the row limit of 1000 bytes (input_max_row_bytes): \'{"url": "http://b.test/"')
    )


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_record_longer_than_max_row_bytes_is_malformed(tmp_path, fmt):
    rows = [("http://a.test/", "a a"), ("http://b.test/", "x" * 5000), ("http://c.test/", "c c")]
    path = write_csv(tmp_path / f"p.{fmt}", rows, sep="," if fmt == "csv" else "\t")
    _, kept, rejects = read_all(SourceSpec(str(path), max_row_bytes=1000))
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/"]
    assert reasons_by_index(rejects) == {1: "malformed_row"}
    assert rejects["detail"][0].as_py().startswith(f"{fmt} line 3: longer than the row limit of 1000 bytes")


# pyarrow cannot hand such a row to its invalid-row handler; it reports that as an ignored exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_row_with_the_wrong_fields_and_bytes_that_are_not_utf8_is_malformed(tmp_path, fmt):
    lines = [
        b"url,caption",
        b"http://a.test/,a a",
        b"http://z.test/,1,2",
        b"http://b.test/\xff,x,y",
        b"http://c.test/,c c",
        b"\xff",
        b"http://d.test/,d d",
    ]
    path = tmp_path / f"p.{fmt}"
    path.write_bytes(b"".join(line.replace(b",", b"," if fmt == "csv" else b"\t") + b"\n" for line in lines))
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/", "http://d.test/"]
    assert reasons_by_index(rejects) == {1: "malformed_row", 2: "malformed_row", 4: "malformed_row"}
    details = rejects["detail"].to_pylist()
    assert details[0].startswith(f"{fmt} line 3: expected 2 columns, got 3: 'http://z.test/")
    assert details[1].startswith(f"{fmt} line 4: expected 2 columns, got 3: 'http://b.test/\ufffd")
    assert details[2].startswith(f"{fmt} line 6: expected 2 columns, got 1: ")


def test_csv_field_of_several_mib_is_kept_under_the_limit_and_rejected_over_it(tmp_path):
    big = "x" * (9 << 20)  # more than twice pyarrow's block: it used to end the run
    path = tmp_path / "p.csv"
    path.write_text(f'url,caption\nhttp://a.test/,a a\nhttp://b.test/,"{big}"\nhttp://c.test/,c c\n')
    _, kept, rejects = read_all(SourceSpec(str(path)))  # the default limit, 4 MiB
    assert kept["url"].to_pylist() == ["http://a.test/", "http://c.test/"]
    assert reasons_by_index(rejects) == {1: "malformed_row"}
    assert rejects["detail"][0].as_py().startswith("csv line 3: longer than the row limit of 4194304 bytes")
    _, kept, rejects = read_all(SourceSpec(str(path), max_row_bytes=16 << 20))
    assert rejects is None
    assert kept["caption"].to_pylist() == ["a a", big, "c c"]


def _bytes_rows(fmt: str, rows: list[tuple[bytes, ...]], header: tuple[str, ...]) -> bytes:
    """csv/tsv bytes as they are, or jsonl where bytes that are not UTF-8 become lone surrogate escapes."""
    if fmt == "jsonl":
        return "".join(
            json.dumps(dict(zip(header, (v.decode("utf-8", "surrogateescape") for v in row)))) + "\n" for row in rows
        ).encode()
    sep = b"," if fmt == "csv" else b"\t"
    return b"".join(sep.join(row) + b"\n" for row in [tuple(h.encode() for h in header), *rows])


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_uid_or_kept_value_that_is_not_utf8_costs_its_row(tmp_path, fmt):
    header = ("key", "url", "caption", "page")
    rows = [
        (b"k1", b"http://a.test/", b"a a", b"p1"),
        (b"k\xff2", b"http://b.test/", b"b b", b"p2"),
        (b"k3", b"http://c.test/", b"c c", b"p\xff3"),
        (b"k4", b"http://d.test/", b"d d", b"p4"),
    ]
    path = tmp_path / f"p.{fmt}"
    if fmt == "parquet":  # a binary uid column, and a string column that holds bytes (parquet checks neither)
        columns = dict(zip(header, zip(*rows)))
        write_parquet(
            path,
            {
                "key": pa.array(columns["key"], pa.binary()),
                "url": [u.decode() for u in columns["url"]],
                "caption": [c.decode() for c in columns["caption"]],
                "page": pa.array(columns["page"], pa.binary()).view(pa.string()),
            },
        )
    else:
        path.write_bytes(_bytes_rows(fmt, rows, header))
    _, kept, rejects = read_all(SourceSpec(str(path), uid_column="key", keep_columns=("page",)))
    assert kept["uid"].to_pylist() == ["k1", "k4"]
    assert kept["page"].to_pylist() == ["p1", "p4"]
    assert reasons_by_index(rejects) == {1: "uid_not_utf8", 2: "kept_column_not_utf8"}
    details = rejects["detail"].to_pylist()
    assert details[0].startswith("'key' is not valid UTF-8") and details[1].startswith("'page' is not valid UTF-8")
    # The rest of a rejected row is recorded with it.
    assert rejects.select(["url", "page"]).to_pylist() == [
        {"url": "http://b.test/", "page": "p2"},
        {"url": "http://c.test/", "page": None},
    ]


def test_csv_unterminated_quote_costs_only_its_line(tmp_path):
    rows = [(f"http://x.test/{i}", f"caption {i}") for i in range(48)]
    lines = ["url,caption", *(",".join(row) for row in rows)]
    lines.insert(4, 'http://x.test/stray,"a quote never closed')  # line 5 of the file
    path = tmp_path / "p.csv"
    path.write_text("\n".join(lines) + "\n")
    shards, kept, rejects = read_all(SourceSpec(str(path)))
    assert shards[0].counts.rows_in == 49
    assert kept.select(["url", "caption"]).to_pylist() == [{"url": u, "caption": c} for u, c in rows]
    assert reasons_by_index(rejects) == {3: "malformed_row"}
    assert rejects["detail"].to_pylist() == [
        "csv line 5: unterminated quote (still open at the end of the file): 'http://x.test/stray,\"a quote never "
        "closed'"
    ]


def test_csv_stray_quotes_cost_only_their_lines(tmp_path):
    # Two stray quotes would join lines 2-4 into one record: its first line goes, the rest is read again.
    path = tmp_path / "p.csv"
    path.write_text(
        'url,caption\nhttp://a.test/,"stray one\nhttp://b.test/,b b\nhttp://c.test/,c "c\n'
        'http://d.test/,"one"\ntwo\nhttp://e.test/,e e\n'
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert kept.select(["url", "caption"]).to_pylist() == [
        {"url": "http://b.test/", "caption": "b b"},
        {"url": "http://c.test/", "caption": 'c "c'},
        {"url": "http://d.test/", "caption": "one"},
        {"url": "http://e.test/", "caption": "e e"},
    ]
    assert reasons_by_index(rejects) == {0: "malformed_row", 4: "malformed_row"}
    details = rejects["detail"].to_pylist()
    assert details[0].startswith("csv line 2: text after a closing quote in a record over 3 lines")
    assert details[1].startswith("csv line 6: expected 2 columns, got 1: 'two'")


def test_csv_multiline_captions_from_a_csv_writer_are_kept(tmp_path):
    captions = ["line one\nline two", "crlf\r\ninside", 'a "quoted" word, and a comma', "three\n\nlines", "plain"]
    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:  # \r\n line ends, quotes where needed
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows((f"http://x.test/{i}", caption) for i, caption in enumerate(captions))
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert rejects is None
    assert kept["caption"].to_pylist() == captions


def test_csv_quote_inside_an_unquoted_field_is_text(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        'url,caption\nhttp://a.test/,a 12" record\nhttp://b.test/,say "hi" there\n'
        'http://c.test/,"quoted"tail\nhttp://d.test/,d d\n'
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert rejects is None
    assert kept["caption"].to_pylist() == ['a 12" record', 'say "hi" there', "quotedtail", "d d"]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_lines_end_with_crlf_or_a_lone_cr(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    sep = b"," if fmt == "csv" else b"\t"
    path.write_bytes(
        b"url"
        + sep
        + b"caption\r\nhttp://a.test/"
        + sep
        + b"a a\r\n\r\nhttp://b.test/"
        + sep
        + b"b b\rhttp://c.test/"
        + sep
        + b"c c"
    )
    _, kept, rejects = read_all(SourceSpec(str(path)))
    assert rejects is None
    assert kept.select(["url", "caption"]).to_pylist() == [
        {"url": f"http://{x}.test/", "caption": f"{x} {x}"} for x in "abc"
    ]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_column_present_twice_is_named(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    if fmt == "parquet":
        pq.write_table(
            pa.table(
                [pa.array(["http://a.test/"]), pa.array(["a a"]), pa.array(["http://b.test/"])],
                names=["url", "caption", "url"],
            ),
            path,
        )
    else:
        write_csv(path, [("http://a.test/", "a a", "http://b.test/")], header=("url", "caption", "url"))
    with pytest.raises(SourceError, match=re.escape(f"column 'url' appears 2 times in {str(path)!r}")):
        probe_source(SourceSpec(str(path)))


@pytest.mark.parametrize(
    "uid",
    [pa.array([{"a": 1}]), pa.array([[1]]), pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), pa.array([1.5])],
    ids=["struct", "list", "map", "float"],
)
def test_parquet_uid_column_that_is_neither_text_nor_integers_is_refused(tmp_path, uid):
    path = write_parquet(tmp_path / "p.parquet", {"id": uid, "url": ["http://a.test/"], "caption": ["a a"]})
    stored = pq.read_schema(path).field("id").type
    with pytest.raises(
        SourceError,
        match=re.escape(f"columns.uid: column 'id' of {str(path)!r} has type {stored}; a uid must be text or integers"),
    ):
        probe_source(SourceSpec(str(path), uid_column="id"))


@pytest.mark.parametrize(
    "header, why",
    [
        ('url,"caption\n', "unterminated quote"),
        ("url," + "c" * 2000 + "\n", "longer than the row limit of 1000 bytes"),
        (b"\xffurl,caption\n", "can't decode byte 0xff"),
    ],
    ids=["open_quote", "too_long", "not_utf8"],
)
def test_csv_header_that_cannot_be_read_names_the_file(tmp_path, header, why):
    path = tmp_path / "p.csv"
    path.write_bytes((header if isinstance(header, bytes) else header.encode()) + b"http://a.test/,a a\n")
    with pytest.raises(SourceError, match=re.escape(f"input file {str(path)!r} cannot be parsed as csv: ")) as info:
        probe_source(SourceSpec(str(path), max_row_bytes=1000))
    assert why in str(info.value)


def _text_pool(fmt: str, rows: list[tuple[str, str]]) -> bytes:
    if fmt == "csv":
        return ("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows)).encode()
    return "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in rows).encode()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_truncated_gzip_keeps_the_rows_before_and_rejects_the_rest_then_reads_on(tmp_path, fmt):
    rows = [(f"http://x.test/{i}", f"caption number {i}") for i in range(100_000)]
    packed = gzip.compress(_text_pool(fmt, rows))
    (tmp_path / "pool").mkdir()
    damaged = tmp_path / "pool" / f"a.{fmt}.gz"
    damaged.write_bytes(packed[: len(packed) // 2])
    after = [("http://y.test/1", "the next file")]
    (tmp_path / "pool" / f"b.{fmt}.gz").write_bytes(gzip.compress(_text_pool(fmt, after)))
    _, kept, rejects = read_all(SourceSpec(str(tmp_path / "pool")), shard_size=30_000)
    assert rejects["reason"].to_pylist() == ["unreadable_input"]
    detail = rejects["detail"][0].as_py()
    assert detail.startswith(f"input file {str(damaged)!r} is unreadable after line ")
    last_line = int(re.search(r"after line (\d+) ", detail).group(1))
    read = last_line - (fmt == "csv")  # the rows on the lines read whole
    assert 10_000 < read < 100_000
    assert kept["url"].to_pylist() == [u for u, _ in rows[:read] + after]
    assert rejects["source_index"].to_pylist() == [read]


def test_gzip_that_cannot_be_read_at_all_names_the_file(tmp_path):
    for fmt in ("csv", "jsonl"):
        path = tmp_path / f"p.{fmt}.gz"
        path.write_bytes(b"this is not gzip data")
        with pytest.raises(SourceError, match=re.escape(f"input file {str(path)!r} cannot be")):
            probe_source(SourceSpec(str(path)))


def test_corrupt_parquet_row_group_rejects_its_rows_then_reads_on(tmp_path):
    (tmp_path / "pool").mkdir()
    damaged = tmp_path / "pool" / "a.parquet"
    urls = [f"http://x.test/{i}" for i in range(300)]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"caption {i}" for i in range(300)]}), damaged, row_group_size=100
    )
    column = pq.ParquetFile(damaged).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(damaged.read_bytes())
    raw[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    damaged.write_bytes(bytes(raw))
    write_parquet(tmp_path / "pool" / "b.parquet", {"url": ["http://y.test/"], "caption": ["the next file"]})
    _, kept, rejects = read_all(SourceSpec(str(tmp_path / "pool")))
    assert kept["url"].to_pylist() == urls[:100] + urls[200:] + ["http://y.test/"]
    assert rejects["source_index"].to_pylist() == list(range(100, 200))
    assert set(rejects["reason"].to_pylist()) == {"unreadable_input"}
    assert (
        rejects["detail"][0]
        .as_py()
        .startswith(f"input file {str(damaged)!r}, row group 1: 100 of its rows cannot be read: ")
    )


# A real pool -----------------------------------------------------------------------------------


def test_laion_style_pool():
    path = shared_path("alttext", "laion_style_10000.parquet")
    source = pq.read_table(path, columns=["URL", "TEXT"])
    shards, kept, rejects = read_all(SourceSpec(str(path)), shard_size=3000)
    assert [s.counts.rows_in for s in shards] == [3000, 3000, 3000, 1000]
    assert sum(s.counts.rows_in for s in shards) == 10_000
    assert kept.num_rows + (0 if rejects is None else rejects.num_rows) == 10_000
    assert kept.column_names == list(BASE_COLUMNS)  # pandas' __index_level_0__ is not carried
    # Auto-detected LAION columns: url is URL, caption is TEXT, row for row.
    by_index = dict(zip(kept["source_index"].to_pylist(), kept["url"].to_pylist()))
    urls = source["URL"].to_pylist()
    assert all(urls[i] == u for i, u in by_index.items())
    captions = source["TEXT"].to_pylist()
    assert all(captions[i] == c for i, c in zip(kept["source_index"].to_pylist(), kept["caption"].to_pylist()))
    assert len(set(kept["uid"].to_pylist())) == kept.num_rows


def test_kept_columns_have_one_schema_in_every_shard(tmp_path):
    rows = [{"url": f"http://x.test/{i}", "caption": "a b", "note": None} for i in range(70_000)]
    rows += [
        {"url": "http://y.test/", "caption": "c d", "note": "late text"},
        {"url": "http://z.test/", "caption": "e f", "note": 5},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    shards = list(read_shards(SourceSpec(str(path), keep_columns=("note",)), 30_000))
    assert len({s.rows.schema for s in shards}) == 1
    assert shards[-1].rows["note"].to_pylist()[-2:] == ["late text", "5"]
