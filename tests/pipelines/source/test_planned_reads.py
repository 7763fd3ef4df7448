"""Parquet pools planned from their footers and read shard by shard, as workers read them: the
same shards, rows, uids and rejects as reading the pool in order."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.source.shards import SourceSpec, plan_parquet_reads, read_planned_shard, read_shards


def _as_read(shard) -> tuple:
    return shard.shard, shard.rows.to_pylist(), shard.rejects.to_pylist() if shard.rejects else [], shard.counts


def _same_both_ways(spec: SourceSpec, shard_size: int) -> list:
    planned = plan_parquet_reads(spec, shard_size)
    in_order = [_as_read(s) for s in read_shards(spec, shard_size)]
    assert [_as_read(read_planned_shard(spec, read)) for read in planned] == in_order
    return planned


def test_shards_cut_across_row_groups_and_files_read_alike(tmp_path):
    (tmp_path / "pool").mkdir()
    for part, (rows, group) in enumerate([(250, 70), (33, 33), (180, 50)]):
        urls = [None if i % 17 == 3 else f"http://x.test/{part}/{i}" for i in range(rows)]
        captions = [f"caption {part} {i}" if i % 23 else None for i in range(rows)]
        pages = pa.array(range(rows), pa.int16() if part == 1 else pa.int64())  # unified to int64
        table = pa.table({"url": urls, "caption": captions, "page": pages})
        pq.write_table(table, tmp_path / "pool" / f"part-{part}.parquet", row_group_size=group)
    spec = SourceSpec(str(tmp_path / "pool"), keep_columns=("page",))
    planned = _same_both_ways(spec, 100)
    assert [read.shard for read in planned] == [0, 1, 2, 3, 4]
    assert planned[2].pieces == (  # rows 200-299: the end of part 0, all of part 1, the start of part 2
        (str(tmp_path / "pool" / "part-0.parquet"), 2, 60, 10),
        (str(tmp_path / "pool" / "part-0.parquet"), 3, 0, 40),
        (str(tmp_path / "pool" / "part-1.parquet"), 0, 0, 33),
        (str(tmp_path / "pool" / "part-2.parquet"), 0, 0, 17),
    )
    assert sum(n for read in planned for *_, n in read.pieces) == 463


def test_shards_cut_inside_a_row_group_larger_than_a_read_batch(tmp_path):
    rows = 140_000  # one row group, decoded in batches of 65,536: shards start and end inside batches
    table = pa.table({"url": [f"http://x.test/{i}" for i in range(rows)], "caption": [f"c {i}" for i in range(rows)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=rows)
    planned = _same_both_ways(SourceSpec(str(tmp_path / "a.parquet")), 50_000)
    assert [read.pieces[0][2:] for read in planned] == [(0, 50_000), (50_000, 50_000), (100_000, 40_000)]


def test_a_damaged_row_group_costs_its_rows_either_way(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table({"url": [f"http://x.test/{i}" for i in range(300)], "caption": [f"c {i}" for i in range(300)]}),
        path,
        row_group_size=100,
    )
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(raw))
    planned = _same_both_ways(SourceSpec(str(path)), 64)
    rejected = [
        r
        for read in planned
        for r in (read_planned_shard(SourceSpec(str(path)), read).rejects or pa.table({})).to_pylist()
    ]
    assert [r["source_index"] for r in rejected] == list(range(100, 200))


def test_text_pools_are_read_in_order_and_uid_pools_are_planned(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("url,caption\nhttp://x.test/a,a cat\n")
    assert plan_parquet_reads(SourceSpec(str(path)), 10) is None
    path = tmp_path / "p.parquet"  # its uids' repeats are found over the whole pool by the engine
    pq.write_table(pa.table({"url": ["http://x.test/a"], "caption": ["a cat"], "key": ["k"]}), path)
    spec = SourceSpec(str(path), uid_column="key")
    assert [sum(n for *_, n in read.pieces) for read in _same_both_ways(spec, 10)] == [1]
