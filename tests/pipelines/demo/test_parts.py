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


@pytest.mark.parametrize("own_data", [False, True])
def test_the_instruction_stages_of_the_generated_and_of_an_own_pool_build(tmp_path, own_data):
    from pipelines.demo.run import Demo, DemoPaths
    from pipelines.engine.config import build_stage

    paths = DemoPaths.under(tmp_path)
    configs = []
    demo = Demo(paths, load_demo_models([]), lambda line: None, configs.append)
    demo.curation("pool.csv", "local", own_data=own_data, boxes_column="boxes" if own_data else None)
    (cfg,) = configs
    stages = {
        entry.stage.rpartition(":")[2]: build_stage(entry, index, 0)
        for index, entry in enumerate(cfg.stages)
        if entry.stage.startswith("generators.instruct")
    }
    absent, instruct = stages["AbsentObjects"].stage, stages["InstructGenerate"].stage
    if own_data:  # no object list for a pool of one's own: no presence questions
        assert absent.identity() == {"vocabulary": []} and instruct.absent_column is None
        assert instruct.response_types == ["conversation"]
    else:  # the scenes' objects: presence records, absent objects as often as present ones
        assert absent.identity()["vocabulary"][:2] == ["black circle", "black cross"]
        assert instruct.absent_column == "absent_objects" in absent.output_columns
        assert instruct.response_types == ["presence", "conversation"]


def test_the_long_budget_sets_its_keys_first_and_trains_into_folders_of_its_own(tmp_path):
    from pipelines.demo.run import DemoPaths

    short, long = load_demo_models([]), load_demo_models(["vlm_stage2.max_steps=7"], long=True)
    assert long.vlm_stage1["max_steps"] > short.vlm_stage1["max_steps"]
    assert long.vlm_stage2["max_steps"] == 7 and long.vlm_stage2["response_types"] == ["brief", "presence"]
    assert long.vlm_stage2["lora"] == short.vlm_stage2["lora"]  # keys the long section leaves alone stay
    assert long.vlm_stage2["batch_size"] > short.vlm_stage2["batch_size"]
    paths, long_paths = DemoPaths.under(tmp_path), DemoPaths.under(tmp_path, long=True)
    assert long_paths.run == paths.run and long_paths.stage1 != paths.stage1
    assert long_paths.evaluation != paths.evaluation
