"""The demo's parts: scenes true to their captions and boxes, the pool's noise, the model config checks."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.demo.pool import write_demo_pool
from pipelines.demo.run import load_demo_models, write_scene_eval_set
from pipelines.demo.scenes import COLORS, SHAPES, instances, photo_crop, render, scene


def test_captions_take_an_before_a_vowel():
    captions = [scene(i).caption for i in range(300)]
    assert any("an orange" in c for c in captions)
    assert not any(" a orange" in f" {c}" for c in captions)
    assert all(c.startswith(("a ", "an ")) for c in captions)


def test_every_object_box_holds_its_colour_at_the_centre():
    for index in range(60):
        s = scene(index)
        pixels = np.asarray(Image.open(io.BytesIO(render(s))).convert("RGB"), dtype=int)
        for shape, box in zip(s.shapes, instances(s)):
            x1, y1, x2, y2 = box["bbox"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert box["category"] == f"{shape.color} {shape.kind}" and box["category"] in s.caption
            centre = pixels[int((y1 + y2) / 2 * s.height), int((x1 + x2) / 2 * s.width)]
            assert np.abs(centre - np.array(COLORS[shape.color])).max() < 40, (index, shape)


def test_shapes_are_head_heavy():
    kinds = Counter(shape.kind for i in range(3000) for shape in scene(i).shapes)
    assert set(kinds) == set(SHAPES)
    assert kinds["circle"] > 3 * kinds["cross"] > 0


def test_photo_crops_are_real_distinct_near_duplicates():
    first, second = (Image.open(io.BytesIO(photo_crop(i))) for i in (1, 2))
    assert first.size == second.size == (288, 288)
    assert photo_crop(1) != photo_crop(2) and photo_crop(1) == photo_crop(1)


def test_the_pool_carries_each_images_boxes(tmp_path):
    path = tmp_path / "pool.csv"
    write_demo_pool(str(path), "http://127.0.0.1:1", rows=400)
    rows = [r for r in csv.reader(path.open()) if len(r) == 3][1:]
    kinds = Counter(r[0].split("/")[3] for r in rows)
    assert {"scene", "near", "photo", "missing", "html", "tiny", "optout"} <= set(kinds)
    for url, _caption, boxes in rows:
        parsed = json.loads(boxes)
        if "/scene/" in url and "?copy" not in url:
            index = int(url.rsplit("/", 1)[1].split(".")[0])
            assert parsed == instances(scene(index))


def test_held_out_scenes_are_written_with_captions_and_probe_objects(tmp_path):
    write_scene_eval_set(tmp_path, 2_000_000, 3)
    captions = [json.loads(x) for x in (tmp_path / "captions.jsonl").read_text().splitlines()]
    probe = [json.loads(x) for x in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [c["captions"] for c in captions] == [[scene(i).caption] for i in range(2_000_000, 2_000_003)]
    assert [p["instances"] for p in probe] == [instances(scene(i)) for i in range(2_000_000, 2_000_003)]
    assert all(Image.open(tmp_path / "images" / c["image"]).size == (320, 240) for c in captions)


def test_model_config_errors_name_the_section_and_key():
    assert load_demo_models(["vlm_stage1.max_steps=7"]).vlm_stage1["max_steps"] == 7
    with pytest.raises(ValueError, match="vlm_stage1"):
        load_demo_models(["vlm_stage1.max_stepz=3"])
    with pytest.raises(ValueError, match="clip"):
        load_demo_models(["clip.batch_size=1"])
    with pytest.raises(ValueError, match="eval"):
        load_demo_models(["eval.heldout_images=0"])
