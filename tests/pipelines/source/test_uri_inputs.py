"""A pool on an object store reads exactly as the same pool on disk: files, folders, globs and
compressed text, through a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines.demo.pool import write_demo_pool
from pipelines.source.pool import PoolReader, file_identities
from pipelines.source.readers import SourceError, SourceSpec, resolve_files
from pipelines.stage import storage
from tests.conftest import TEXT_ONLY_HOST
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def pools(tmp_path_factory, s3):
    """The same 1,500-row pool as csv, parquet and gzipped jsonl, on disk and in a bucket."""
    root = tmp_path_factory.mktemp("uri-pools")
    csv = root / "pool.csv"
    write_demo_pool(str(csv), TEXT_ONLY_HOST, rows=1500, seed=7)
    # The csv keeps the pool's malformed lines; parquet and jsonl take the rows that parse.
    table = pacsv.read_csv(csv, parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"))
    pq.write_table(table, root / "pool.parquet", row_group_size=400)
    with gzip.open(root / "pool.jsonl.gz", "wt") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    bucket = s3.bucket("pools")
    for name in ("pool.csv", "pool.parquet", "pool.jsonl.gz"):
        s3.put_file(f"{bucket}/one/{name}", str(root / name))
    return root, bucket


def _shards(path: str) -> list[tuple[list, list]]:
    reader = PoolReader(SourceSpec(path=path))
    return [
        (shard.rows.to_pylist(), shard.rejects.to_pylist() if shard.rejects is not None else [])
        for shard in reader.read_shards(500)
    ]


@pytest.mark.parametrize("name", ["pool.csv", "pool.parquet", "pool.jsonl.gz"])
def test_a_pool_on_s3_gives_the_rows_uids_and_rejects_it_gives_on_disk(pools, name):
    root, bucket = pools
    local, remote = str(root / name), f"{bucket}/one/{name}"
    assert _shards(remote) == _shards(local)
    assert file_identities(remote) == file_identities(local)  # a copy to the bucket is the same input


def test_a_parquet_pool_in_a_bucket_is_planned_and_read_by_shard_as_on_disk(pools):
    """What workers do with a parquet pool: plan from the footers, read shard by shard."""
    from pipelines.source.shards import plan_parquet_reads, read_planned_shard

    root, bucket = pools
    shards = {}
    for where, path in (("disk", str(root / "pool.parquet")), ("bucket", f"{bucket}/one/pool.parquet")):
        spec = SourceSpec(path=path)
        shards[where] = [read_planned_shard(spec, read).rows for read in plan_parquet_reads(spec, 500)]
    assert len(shards["disk"]) == 3 and all(a.equals(b) for a, b in zip(shards["disk"], shards["bucket"]))
    in_order = [rows for rows, _ in _shards(str(root / "pool.parquet"))]
    assert [t.to_pylist() for t in shards["bucket"]] == in_order


def test_folders_and_globs_list_the_bucket(pools, s3):
    root, bucket = pools
    for part in range(2):
        s3.put_file(f"{bucket}/parts/part-{part}.parquet", str(root / "pool.parquet"))
    s3.put(f"{bucket}/parts/_SUCCESS", b"")
    s3.put(f"{bucket}/parts/deeper/part-9.parquet", b"not listed")
    expected = [f"{bucket}/parts/part-0.parquet", f"{bucket}/parts/part-1.parquet"]
    assert resolve_files(f"{bucket}/parts") == expected
    assert resolve_files(f"{bucket}/parts/") == expected
    assert resolve_files(f"{bucket}/parts/part-*.parquet") == expected
    assert [i["file"] for i in file_identities(f"{bucket}/parts")] == ["part-0.parquet", "part-1.parquet"]


def test_a_missing_object_or_bucket_is_named_before_anything_is_read(pools):
    _, bucket = pools
    with pytest.raises(SourceError, match=f"input file '{bucket}/one/nothing.parquet' does not exist"):
        PoolReader(SourceSpec(path=f"{bucket}/one/nothing.parquet"))
    with pytest.raises(SourceError, match="s3://no-such-bucket/pool.parquet"):
        PoolReader(SourceSpec(path="s3://no-such-bucket/pool.parquet"))
    with pytest.raises(SourceError, match=f"input glob '{bucket}/one/\\*.tsv' matches no file"):
        PoolReader(SourceSpec(path=f"{bucket}/one/*.tsv"))


def test_credentials_in_a_uri_are_refused_without_repeating_them():
    with pytest.raises(storage.StorageError, match="not from the URI") as error:
        storage.open_filesystem("s3://AKIAEXAMPLE:sec-ret@pools/one/pool.csv")
    assert "sec-ret" not in str(error.value) and "AKIAEXAMPLE" not in str(error.value)
    with pytest.raises(storage.StorageError, match="not from the URI"):
        storage.open_filesystem("s3://pools/one/pool.csv?endpoint_override=http://127.0.0.1:9")


def test_a_stage_reads_its_file_from_the_bucket(pools, s3, tmp_path):
    from curation.metaclip import MetaclipMatch

    _, bucket = pools
    local = tmp_path / "metadata.json"
    local.write_text(json.dumps(["dog", "cat"]))
    remote = s3.put_file(f"{bucket}/lists/metadata.json", str(local))
    on_disk, in_bucket = MetaclipMatch(metadata=str(local)), MetaclipMatch(metadata=remote)
    assert in_bucket.identity() == on_disk.identity()
    in_bucket.setup()
    table = pa.table({"caption": ["a dog", "a tree"]})
    assert in_bucket(table)["metaclip_entries"].to_pylist() == [[0], []]


def test_wrong_credentials_are_named_with_the_uri_before_anything_is_written(pools, s3, tmp_path):
    from pipelines.engine.config import parse_config
    from pipelines.job import build_plan

    _, bucket = pools
    config = parse_config({"name": "x", "input": f"{bucket}/one/pool.parquet", "output_dir": str(tmp_path / "runs")})
    with s3.authenticating():  # the test keys are unknown to the server's IAM: every request is refused
        with pytest.raises(SourceError) as error:
            build_plan(config)
    message = str(error.value)
    assert f"{bucket}/one/pool.parquet" in message
    assert "credentials" in message and "AWS_ACCESS_KEY_ID" in message
    assert not (tmp_path / "runs").exists()


class _HubStandIn:
    """An ``hf://`` filesystem for the test: the Hub cannot be reached offline, so the scheme is
    served by fsspec's directory filesystem over a local folder (the Hub's paths, its files)."""

    @staticmethod
    def register(root: str):
        import fsspec
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem

        class HubFolder(DirFileSystem):
            protocol = "hf"

            def __init__(self, **options):
                super().__init__(path=root, fs=LocalFileSystem(), **options)

            @classmethod
            def _strip_protocol(cls, path):
                return path.removeprefix("hf://") if isinstance(path, str) else path

        fsspec.register_implementation("hf", HubFolder, clobber=True)


def test_a_pool_on_the_hub_is_read_through_fsspec_as_on_disk(pools, tmp_path):
    import fsspec

    root, _ = pools
    hub = tmp_path / "hub" / "datasets" / "vlmc" / "pool"
    hub.mkdir(parents=True)
    (hub / "pool.parquet").write_bytes((root / "pool.parquet").read_bytes())
    try:
        previous = fsspec.get_filesystem_class("hf")  # huggingface_hub's, where it is installed
    except ImportError:
        previous = None
    _HubStandIn.register(str(tmp_path / "hub"))
    try:
        on_hub = _shards("hf://datasets/vlmc/pool/pool.parquet")
        globbed = resolve_files("hf://datasets/vlmc/pool/*.parquet")
    finally:
        if previous is not None:
            fsspec.register_implementation("hf", previous, clobber=True)
    assert on_hub == _shards(str(root / "pool.parquet"))
    assert globbed == ["hf://datasets/vlmc/pool/pool.parquet"]
