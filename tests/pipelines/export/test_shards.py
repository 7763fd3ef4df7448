"""Export: uniform shards, webdataset tars open_clip reads, parquet, determinism, reruns."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
from argparse import Namespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.engine.config import parse_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.runner import LocalRunner
from pipelines.export.keys import image_extension, sample_key
from pipelines.export.shards import plan_export, write_webdataset
from pipelines.job import build_plan
from schemas.manifest import ShardEntry, StageCounts
from tests.conftest import read_phase
from tests.http_server import ImageServer, make_image


def _entries(rows_out: list[int]) -> dict[int, ShardEntry]:
    return {i: ShardEntry("01_x", i, n, n, {"x": StageCounts(n, n, {})}) for i, n in enumerate(rows_out)}


def test_plan_export_cuts_uniform_shards_across_pipeline_shards():
    shards = plan_export(_entries([7, 0, 5, 2]), samples_per_shard=4)
    assert [s.rows for s in shards] == [4, 4, 4, 2]
    assert shards[1].pieces == ((0, 4, 3), (2, 0, 1))  # the tail of shard 0, the head of shard 2
    assert plan_export(_entries([3]), samples_per_shard=10)[0].pieces == ((0, 0, 3),)
    assert plan_export(_entries([0, 0]), samples_per_shard=10) == []


def webdataset_tar(rows: pa.Table) -> bytes:
    buffer = io.BytesIO()
    write_webdataset(rows, buffer)
    return buffer.getvalue()


def _rows(n: int) -> pa.Table:
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "source_index": list(range(n)),
            "caption": [f"a caption {i}" for i in range(n)],
            "image": [make_image(40, 30, seed=i) for i in range(n)],
            "score": [0.5, float("nan"), 1.0][:n] + [0.0] * max(0, n - 3),
        }
    )


def test_tar_members_are_grouped_per_sample_with_fixed_metadata():
    data = webdataset_tar(_rows(3))
    assert data == webdataset_tar(_rows(3))  # byte-identical for the same rows
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:3] == [f"{0:032x}.jpg", f"{0:032x}.txt", f"{0:032x}.json"]
        assert {m.mtime for m in members} == {0}
        meta = json.loads(tar.extractfile(names[5]).read())
    assert meta == {"uid": f"{1:032x}", "source_index": 1, "score": None, "caption": "a caption 1"}


def test_keys_are_safe_for_webdataset_grouping():
    assert sample_key("930aefc3a71d76a7000dec8f603ec76f") == "930aefc3a71d76a7000dec8f603ec76f"
    for uid in ("s3.v2", "flickr/1000.jpg", "x" * 300, "ünïcode"):
        key = sample_key(uid)
        assert re.fullmatch(r"h[0-9a-f]{32}", key) and key == sample_key(uid)
    rows = _rows(2).set_column(0, "uid", pa.array(["s3.v2", "flickr/1000.jpg"]))
    with tarfile.open(fileobj=io.BytesIO(webdataset_tar(rows))) as tar:
        names = tar.getnames()
        assert all(name.count(".") == 1 for name in names)
        assert json.loads(tar.extractfile(names[2]).read())["uid"] == "s3.v2"  # the uid travels in the json


def test_a_uid_shaped_like_a_hashed_key_cannot_shadow_another_sample():
    hashed = sample_key("s3.v2")
    assert sample_key(hashed) != hashed  # the pool names a row after another row's hashed key
    rows = _rows(2).set_column(0, "uid", pa.array(["s3.v2", hashed]))
    with tarfile.open(fileobj=io.BytesIO(webdataset_tar(rows))) as tar:
        keys = {name.split(".")[0] for name in tar.getnames()}
    assert len(keys) == 2


def test_image_extensions_follow_the_bytes():
    assert image_extension(make_image(8, 8, "PNG")) == "png"
    assert image_extension(make_image(8, 8, "WEBP")) == "webp"
    with pytest.raises(ValueError, match="unknown format"):
        image_extension(b"GIF89a....")
    with pytest.raises(ValueError, match="needs the image column"):
        webdataset_tar(_rows(2).drop_columns(["image"]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    server = ImageServer()
    pool = tmp / "pool.csv"
    with open(pool, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(23):
            writer.writerow([server.add(f"{i}.jpg", make_image(80, 60, seed=i)), f"a picture numbered {i}"])
    config = {
        "name": "exp",
        "input": str(pool),
        "output_dir": str(tmp / "runs"),
        "shard_size": 6,
        "stages": [{"stage": "pipelines.download:Download", "allow_addresses": ["127.0.0.1"], "threads": 4}],
        "export": {"samples_per_shard": 10},
    }
    plan = build_plan(parse_config(config))
    manifest = run_pipeline(plan, LocalRunner())
    yield config, plan, manifest, tmp / "runs" / "exp" / "export"
    server.close()


def test_export_writes_uniform_tars_sizes_and_parquet(exported):
    _, plan, manifest, folder = exported
    assert json.loads((folder / "webdataset" / "sizes.json").read_text()) == {
        "00000.tar": 10,
        "00001.tar": 10,
        "00002.tar": 3,
    }
    parquet = pa.concat_tables([pq.read_table(folder / "parquet" / f"{i:05d}.parquet") for i in range(3)])
    assert parquet.equals(read_phase(plan.run_uri, manifest.final_phase))  # every column, in order
    assert manifest.export["rows"] == 23 and manifest.export["shards"] == 3


def test_open_clip_reads_the_tars(exported):
    import torch
    from open_clip_train.data import get_wds_dataset
    from torchvision import transforms

    _, _, _, folder = exported
    args = Namespace(
        train_data=str(folder / "webdataset" / "{00000..00002}.tar"),
        train_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=4,
        workers=0,
        world_size=1,
    )
    preprocess = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=lambda text: torch.zeros(1, 77))
    images, texts = next(iter(info.dataloader))
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 77)
    assert info.dataloader.num_samples == 24  # 23 rows from sizes.json, rounded up to whole batches


def test_rerun_skips_the_export_and_new_settings_rewrite_it(exported, tmp_path):
    shared, _, _, _ = exported
    # This test rewrites the export: it works on its own copy of the run, which the other tests read.
    shutil.copytree(shared["output_dir"], tmp_path / "runs")
    config, folder = {**shared, "output_dir": str(tmp_path / "runs")}, tmp_path / "runs" / "exp" / "export"
    tar = folder / "webdataset" / "00000.tar"
    before = os.stat(tar).st_mtime_ns
    run_pipeline(build_plan(parse_config(config)), LocalRunner())
    assert os.stat(tar).st_mtime_ns == before
    manifest = run_pipeline(
        build_plan(parse_config({**config, "export": {"samples_per_shard": 20, "formats": ["webdataset"]}})),
        LocalRunner(),
    )
    assert sorted(os.listdir(folder / "webdataset")) == ["00000.tar", "00001.tar", "sizes.json"]
    assert not (folder / "parquet").exists()  # stale files of the old export are gone
    assert manifest.export["samples_per_shard"] == 20
