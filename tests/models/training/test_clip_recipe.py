"""The CLIP recipe on exported shards: learning, exact resume, cached frozen towers, checkpoints."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.clip import load_clip, preprocess_spec
from models.training.clip_recipe import ClipTrainConfig, train_clip
from models.training.shards import epoch_samples, resolve_shards
from pipelines.export.shards import write_webdataset

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _rows(n: int) -> pa.Table:
    uids, captions, images = [], [], []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        noise = np.random.default_rng(i).integers(-30, 30, (40, 40, 3))
        pixels = np.clip(np.array(COLORS[name]) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        uids.append(f"u{i:03d}")
        captions.append(f"a {name} picture")
        images.append(buffer.getvalue())
    images[5] = images[5][:100]  # a truncated JPEG: skipped with a reason, never fatal
    return pa.table({"uid": uids, "caption": captions, "image": images})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    rows = _rows(48)
    (folder / "webdataset").mkdir()
    for k in range(2):
        with open(folder / "webdataset" / f"{k:05d}.tar", "wb") as out:
            write_webdataset(rows.slice(24 * k, 24), out)
    (folder / "parquet").mkdir()
    pq.write_table(rows, folder / "parquet" / "00000.parquet")
    return folder


def _config(shards, out, **overrides) -> ClipTrainConfig:
    base = dict(
        model="tiny-vit",
        train_data=[str(shards / "webdataset")],
        output_dir=str(out),
        batch_size=12,
        max_steps=12,
        lr=2e-3,
        warmup_steps=0,
        save_every=4,
        lock_image=False,
        lock_text=False,
        decode_threads=1,
        shuffle_buffer=16,
        seed=3,
    )
    return ClipTrainConfig(**{**base, **overrides})


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_records_undecodable_samples(shards, tmp_path):
    train_clip(_config(shards, tmp_path))
    losses = _losses(tmp_path)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    skipped = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert skipped and all(s["key"] == "u005" and "Error" in s["reason"] for s in skipped)


def test_resume_continues_from_the_saved_step_exactly(shards, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_clip(_config(shards, whole, max_steps=8))
    train_clip(_config(shards, parts, max_steps=8, save_every=4))
    # Drop the last checkpoint and the log after step 4, as if the run had been killed there.
    (parts / "checkpoints" / "step-00000008.pt").unlink()
    lines = (parts / "metrics.jsonl").read_text().splitlines()[:4]
    (parts / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train_clip(_config(shards, parts, max_steps=8))
    assert [json.loads(x)["step"] for x in (parts / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert _losses(parts) == pytest.approx(_losses(whole), abs=1e-5)
    a = torch.load(whole / "checkpoints" / "step-00000008.pt", weights_only=False)["model"]
    b = torch.load(parts / "checkpoints" / "step-00000008.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_finished_run_is_not_trained_again(shards, tmp_path):
    train_clip(_config(shards, tmp_path, max_steps=2))
    assert train_clip(_config(shards, tmp_path, max_steps=2)) == {"step": 2, "done": True}


def test_locked_packaged_towers_train_heads_on_cached_features(shards, tmp_path):
    config = _config(
        shards, tmp_path, model="tiny-effnet-minilm", lock_image=True, lock_text=True, lr=1e-2, max_steps=16
    )
    train_clip(config)
    assert (tmp_path / "feature_cache-rank0.pt").exists()
    losses = _losses(tmp_path)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    saved = torch.load(tmp_path / "checkpoints" / "step-00000016.pt", weights_only=False)
    fresh = load_clip("tiny-effnet-minilm").model.state_dict()
    changed = {k for k, v in saved["model"].items() if not torch.equal(v, fresh[k])}
    assert changed == {"visual.head.proj.weight", "text.proj.weight", "logit_scale"}  # towers untouched


def test_cached_features_draw_each_epoch_from_the_keep_probability(tmp_path):
    from models.training.clip_recipe import ClipTask
    from models.training.shards import in_epoch

    rows = _rows(48).append_column("keep_probability", pa.array([1.0, 0.5] * 24, pa.float32()))
    (tmp_path / "data").mkdir()
    pq.write_table(rows, tmp_path / "data" / "00000.parquet")
    config = _config(
        tmp_path,
        tmp_path / "out",
        model="tiny-effnet-minilm",
        train_data=[str(tmp_path / "data")],
        lock_image=True,
        lock_text=True,
        batch_size=4,
    )
    task = ClipTask(config, torch.device("cpu"))
    keys, chances = task.cache["keys"], task.cache["keep_probability"].numpy()
    assert len(keys) == 47 and "u005" not in keys  # the undecodable sample is not cached
    for epoch in range(3):
        members = int(in_epoch(config.seed, epoch, keys, chances).sum())
        assert 24 <= members < 47
        assert sum(1 for _ in task.batches(epoch, 0)) == members // 4


def test_checkpoints_load_back_with_their_architecture_and_preprocessing(shards, tmp_path):
    train_clip(_config(shards, tmp_path, max_steps=2))
    bundle = load_clip(checkpoint=str(tmp_path))
    assert bundle.name == "tiny-vit" and bundle.source["step"] == 2
    assert preprocess_spec(checkpoint=str(tmp_path)) == bundle.spec
    saved = torch.load(tmp_path / "checkpoints" / "step-00000002.pt", weights_only=False)["model"]
    assert torch.equal(bundle.model.state_dict()["logit_scale"], saved["logit_scale"])


def test_parquet_shards_and_run_folders_are_sources(shards, tmp_path):
    assert resolve_shards([str(shards)]) == sorted((shards / "webdataset").glob("*.tar"))
    files = resolve_shards([str(shards / "parquet")])
    from_parquet = [s.key for s in epoch_samples(files, seed=0, epoch=0, shuffle_buffer=0)]
    from_tars = [s.key for s in epoch_samples(resolve_shards([str(shards)]), seed=0, epoch=0, shuffle_buffer=0)]
    assert sorted(from_parquet) == sorted(from_tars) and len(from_parquet) == 48
    train_clip(_config(shards, tmp_path, train_data=[str(shards / "parquet")], max_steps=2))


def test_epoch_order_depends_on_seed_and_epoch_only(shards):
    files = resolve_shards([str(shards)])
    keys = lambda **kw: [s.key for s in epoch_samples(files, shuffle_buffer=10, **kw)]  # noqa: E731
    assert keys(seed=1, epoch=0) == keys(seed=1, epoch=0)
    assert keys(seed=1, epoch=0) != keys(seed=1, epoch=1)
    assert sorted(keys(seed=1, epoch=0)) == sorted(keys(seed=2, epoch=5))
    halves = keys(seed=1, epoch=0, rank=0, world_size=2) + keys(seed=1, epoch=0, rank=1, world_size=2)
    assert sorted(halves) == sorted(keys(seed=1, epoch=0))


def test_bad_configs_and_sources_fail_clearly(shards, tmp_path):
    with pytest.raises(ValueError, match="extra"):
        ClipTrainConfig(train_data=["x"], output_dir=str(tmp_path), learning_rate=1.0)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_shards([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(FileNotFoundError, match="no .tar or .parquet"):
        resolve_shards([str(tmp_path)])


def test_the_loop_takes_the_recipes_settings_by_name():
    from models.training.clip_recipe import ClipTrainConfig
    from models.training.llava_recipe import VlmTrainConfig
    from models.training.loop import LoopConfig

    clip = ClipTrainConfig(train_data=["x"], output_dir="o", max_steps=7, lr=0.5, eval_every=3, seed=4)
    loop = clip.loop_config()
    assert (loop.max_steps, loop.lr, loop.eval_every, loop.seed, loop.weight_decay) == (7, 0.5, 3, 4, 0.1)
    assert loop.beta2 == LoopConfig(max_steps=1, lr=1.0).beta2  # what no recipe sets keeps the loop's default
    vlm = VlmTrainConfig(train_data=["x"], output_dir="o", stage=2)
    assert (vlm.loop_config().lr, vlm.loop_config().weight_decay) == (2e-5, 0.0)
