"""Locations: local paths and URIs, listed, globbed and read through one set of functions."""

from __future__ import annotations

import gzip
import uuid

import pytest

from pipelines.stage import storage


def test_local_folders_globs_sizes_and_compressed_streams(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption\n")
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(b"url,caption\nu,c\n"))
    (tmp_path / "sub").mkdir()
    assert storage.kind(str(tmp_path)) == "folder" and storage.kind(str(tmp_path / "x")) == "missing"
    assert storage.list_folder(str(tmp_path)) == [str(tmp_path / "a.csv"), str(tmp_path / "b.csv.gz")]
    assert storage.glob(str(tmp_path / "*.csv")) == [str(tmp_path / "a.csv")]
    assert storage.file_size(str(tmp_path / "a.csv")) == 12
    with storage.open_input_stream(str(tmp_path / "b.csv.gz")) as stream:
        assert stream.read() == b"url,caption\nu,c\n"
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.file_size(str(tmp_path / "missing.csv"))


def test_fsspec_schemes_list_glob_and_read_like_the_others():
    import fsspec

    root = f"memory://vlmc-{uuid.uuid4().hex}"
    memory = fsspec.filesystem("memory")
    for name in ("pool/p-0.jsonl", "pool/p-1.jsonl", "pool/deeper/p-2.jsonl"):
        memory.pipe(f"{root}/{name}", b'{"url": "u", "caption": "c"}\n')
    assert storage.kind(f"{root}/pool") == "folder"
    assert storage.list_folder(f"{root}/pool") == [f"{root}/pool/p-0.jsonl", f"{root}/pool/p-1.jsonl"]
    assert storage.glob(f"{root}/pool/p-*.jsonl") == [f"{root}/pool/p-0.jsonl", f"{root}/pool/p-1.jsonl"]
    assert storage.read_bytes(f"{root}/pool/p-1.jsonl").startswith(b'{"url"')
    assert storage.file_digest(f"{root}/pool/p-0.jsonl") == storage.file_digest(f"{root}/pool/p-1.jsonl")


def test_where_a_location_lies_and_its_parent():
    assert storage.is_uri("s3://bucket/key") and storage.is_uri("hf://datasets/x") and not storage.is_uri("a/b")
    assert storage.parent("s3://bucket/runs/name/") == "s3://bucket/runs"
    # A listing's paths become locations of the same form: authority kept, the store's own path form.
    assert (
        storage.relocate("hdfs://nn:8020/data/x", "/data/x", "/data/x/a.parquet") == "hdfs://nn:8020/data/x/a.parquet"
    )
    assert storage.relocate("memory://pool/p-*.csv", "/pool/p-*.csv", "/pool/p-0.csv") == "memory://pool/p-0.csv"
    assert storage.relocate("s3://bucket/pool", "bucket/pool", "bucket/pool/a.csv") == "s3://bucket/pool/a.csv"
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x" and storage.absolute("x").startswith("/")
    with pytest.raises(storage.StorageError, match="install the fsspec implementation"):
        storage.open_filesystem("nosuchscheme://somewhere/file")
