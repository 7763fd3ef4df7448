"""The trained VLM as CapFilt's captioner: same columns and seeding as BLIP's, then the same filter."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from generators.capfilt_vlm import VlmCaption
from schemas.columns import CAPTION_SCORES, CAPTION_SEED, CAPTION_SOURCE, SYNTHETIC_CAPTIONS
from tests.conftest import read_phase, read_rejects, run_pipeline_dict


def _config(tmp_path, name, **caption):
    captions = [f"photo {i}" for i in range(8)]
    captions[5] = "a corrupt file"  # tests.stages:PaintImages writes bytes that do not decode for it
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": [f"http://img.test/{i}.png" for i in range(8)], "caption": captions}), path)
    stage = {
        "stage": "generators.capfilt_vlm:VlmCaption",
        "model": "tiny-vit-llama",
        "num_captions": 2,
        "max_new_tokens": 6,
        "resources": {"batch_size": 3},
    } | caption
    return {
        "name": name,
        "input": str(path),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 4,
        "stages": [{"stage": "tests.stages:PaintImages"}, stage],
    }


def test_vlm_captions_are_sampled_per_image_reproducibly_and_bad_images_are_rejects(tmp_path, runner_factory):
    plan, manifest = run_pipeline_dict(_config(tmp_path, "vlm-cap"), runner_factory("local"))
    rows = read_phase(plan.run_uri, manifest.final_phase)
    captions = rows[SYNTHETIC_CAPTIONS].to_pylist()
    assert len(captions) == 7 and all(len(c) == 2 and all(isinstance(t, str) for t in c) for c in captions)
    assert any(len(set(c)) > 1 for c in captions)  # sampled: an image's captions may differ
    assert Counter(read_rejects(plan.run_uri)["reason"].to_pylist()) == {"decode_error": 1}
    assert len(set(rows[CAPTION_SEED].to_pylist())) > 1  # one seed per batch
    plan, manifest = run_pipeline_dict(_config(tmp_path, "vlm-cap-again"), runner_factory("local"))
    assert read_phase(plan.run_uri, manifest.final_phase)[SYNTHETIC_CAPTIONS].to_pylist() == captions


def test_a_trained_checkpoint_captions_greedily_and_feeds_the_itm_filter(tmp_path, runner_factory):
    from typer.testing import CliRunner

    from pipelines.cli.main import app
    from tests.models.training.test_llava_recipe import write_llava_export

    train = tmp_path / "vlm.yaml"
    train.write_text(
        yaml.safe_dump(
            {
                "model": "tiny-vit-llama",
                "stage": 1,
                "train_data": [str(write_llava_export(tmp_path))],
                "output_dir": str(tmp_path / "vlm"),
                "batch_size": 2,
                "max_steps": 1,
                "device": "cpu",
            }
        )
    )
    assert CliRunner().invoke(app, ["train", "vlm", str(train)]).exit_code == 0
    raw = _config(tmp_path, "vlm-capfilt", model=None, weights=str(tmp_path / "vlm"), greedy=True, num_captions=1)
    raw["stages"] += [
        {"stage": "generators.capfilt:BlipPreprocess"},
        {"stage": "generators.capfilt_filter:BlipItmScore", "resources": {"batch_size": 4}},
        {"stage": "generators.capfilt_filter:CapFiltSelect", "threshold": 0.5},
    ]
    plan, manifest = run_pipeline_dict(raw, runner_factory("local"))
    rows = read_phase(plan.run_uri, manifest.final_phase)
    assert all(len(s) == 2 for s in rows[CAPTION_SCORES].to_pylist())  # the web caption and the VLM's
    assert set(rows[CAPTION_SOURCE].to_pylist()) <= {"web", "synthetic"}
    totals = manifest.stage_totals()
    assert all(c.rows_in == c.rows_kept + sum(c.rejected.values()) for c in totals.values())


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="exactly one of weights"):
        VlmCaption()
    with pytest.raises(ValueError, match="exactly one of weights"):
        VlmCaption(weights="x", model="tiny-vit-llama")
    with pytest.raises(ValueError, match="greedy decoding writes one caption"):
        VlmCaption(model="tiny-vit-llama", greedy=True)
    with pytest.raises(ValueError, match="top_p"):
        VlmCaption(model="tiny-vit-llama", top_p=0)
