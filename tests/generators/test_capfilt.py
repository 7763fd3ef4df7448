"""CapFilt captioning with a tiny random BLIP: counts, sampling, seeds, runners, bad images."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generators.capfilt import BlipCaption
from schemas.columns import CAPTION_SEED, SYNTHETIC_CAPTIONS
from tests.conftest import read_phase, read_rejects, run_pipeline_dict


def _config(tmp_path, name, **caption):
    captions = [f"photo {i}" for i in range(12)]
    captions[5] = "a corrupt file"
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": [f"http://img.test/{i}.png" for i in range(12)], "caption": captions}), path)
    return {"name": name, "input": str(path), "output_dir": str(tmp_path / "runs"), "shard_size": 6,
            "stages": [{"stage": "tests.stages:PaintImages"},
                       {"stage": "generators.capfilt:BlipPreprocess"},
                       {"stage": "generators.capfilt:BlipCaption", "num_captions": 3, "max_new_tokens": 8,
                        "resources": {"batch_size": 4}, **caption}]}


def test_captions_per_image_differ_reproduce_and_agree_across_runners(tmp_path, runner_factory):
    results = {}
    for kind in ("local", "ray"):
        plan, manifest = run_pipeline_dict(_config(tmp_path, f"cap-{kind}"), runner_factory(kind))
        rows = read_phase(plan.run_uri, manifest.final_phase)
        results[kind] = (rows["uid"].to_pylist(), rows[SYNTHETIC_CAPTIONS].to_pylist(), rows[CAPTION_SEED].to_pylist())
        assert Counter(read_rejects(plan.run_uri)["reason"].to_pylist()) == {"decode_error": 1}
        assert "blip_pixels" not in rows.column_names
    assert results["local"] == results["ray"]
    captions = results["local"][1]
    assert len(captions) == 11 and all(len(c) == 3 for c in captions)
    assert all(len(set(c)) > 1 for c in captions)  # sampling: the three captions of an image differ
    plan, manifest = run_pipeline_dict(_config(tmp_path, "cap-again"), runner_factory("local"))
    assert read_phase(plan.run_uri, manifest.final_phase)[SYNTHETIC_CAPTIONS].to_pylist() == captions
    plan, manifest = run_pipeline_dict(_config(tmp_path, "cap-seed", seed=7), runner_factory("local"))
    assert read_phase(plan.run_uri, manifest.final_phase)[SYNTHETIC_CAPTIONS].to_pylist() != captions


def test_beam_search_gives_deterministic_captions(tmp_path, runner_factory):
    plan, manifest = run_pipeline_dict(_config(tmp_path, "beam", num_beams=3), runner_factory("local"))
    rows = read_phase(plan.run_uri, manifest.final_phase)
    assert all(len(c) == 3 for c in rows[SYNTHETIC_CAPTIONS].to_pylist())


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="num_captions"):
        BlipCaption(num_captions=0)
    with pytest.raises(ValueError, match="at most num_beams"):
        BlipCaption(num_beams=2, num_captions=5)
    with pytest.raises(ValueError, match="top_p"):
        BlipCaption(top_p=0)
