"""AbsentObjects: the presence questions' absent objects, drawn as often as the pool holds each object."""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow as pa
import pytest

from generators.instruct import AbsentObjects, InstructGenerate
from pipelines.demo.scenes import instances, object_names, scene
from pipelines.engine.keyed import summed_counts
from schemas.columns import ABSENT_OBJECTS, INSTRUCTIONS


def _pool(rows: int) -> pa.Table:
    scenes = [scene(i) for i in range(rows)]  # head-heavy shapes and colours
    return pa.table(
        {
            "uid": [f"scene-{i}" for i in range(rows)],
            "caption": [s.caption for s in scenes],
            "boxes": [json.dumps(instances(s)) for s in scenes],
        }
    )


def _decided(stage: AbsentObjects, table: pa.Table) -> pa.Table:
    parts = [stage.counts(table.slice(i, 500), None) for i in range(0, table.num_rows, 500)]
    state, done = stage.from_counts(summed_counts(pa.concat_tables(parts)), None)
    assert done
    return table.append_column(ABSENT_OBJECTS, stage.decide(table, state)[ABSENT_OBJECTS])


def _answers(table: pa.Table, **settings) -> dict[str, Counter]:
    """Per object, how often a presence question about it is answered yes and no."""
    stage = InstructGenerate(response_types=["conversation"], boxes_column="boxes", **settings)
    stage.setup()
    answers: dict[str, Counter] = {"yes": Counter(), "no": Counter()}
    for records in stage(table)[INSTRUCTIONS].to_pylist():
        turns = [t["value"] for t in records[0]["conversations"]]
        for question, answer in zip(turns[::2], turns[1::2]):
            if match := re.search(r"Is there an? (.+) in the image\?", question):
                answers["yes" if answer.startswith("Yes") else "no"][match.group(1)] += 1
    return answers


def test_each_common_object_is_a_no_about_as_often_as_a_yes():
    table = _pool(3_000)
    frequent = [
        name
        for name, _ in Counter(i["category"] for s in map(scene, range(3_000)) for i in instances(s)).most_common(6)
    ]
    drawn = _answers(_decided(AbsentObjects(vocabulary=object_names()), table), absent_column=ABSENT_OBJECTS)
    uniform = _answers(table, absent_objects=object_names())
    for name in frequent:
        assert 0.7 < drawn["yes"][name] / drawn["no"][name] < 1.4, (name, drawn["yes"][name], drawn["no"][name])
    # Drawn uniformly, the most common object is a "yes" many times more often than a "no".
    assert uniform["yes"][frequent[0]] > 5 * uniform["no"][frequent[0]]
    assert sum(drawn["yes"].values()) == sum(drawn["no"].values())


def test_the_draw_is_seeded_by_the_row_and_never_names_a_present_object():
    table = _pool(300)
    stage = AbsentObjects(vocabulary=object_names(), per_row=4)
    first, again = _decided(stage, table), _decided(stage, table.slice(0, 300))
    assert first[ABSENT_OBJECTS].to_pylist() == again[ABSENT_OBJECTS].to_pylist()
    for boxes, absent in zip(table["boxes"].to_pylist(), first[ABSENT_OBJECTS].to_pylist()):
        assert len(absent) == len(set(absent)) == 4
        assert not set(absent) & {b["category"] for b in json.loads(boxes)}
    reseeded = _decided(AbsentObjects(vocabulary=object_names(), per_row=4, seed=1), table)
    assert reseeded[ABSENT_OBJECTS].to_pylist() != first[ABSENT_OBJECTS].to_pylist()


def test_rows_whose_boxes_do_not_parse_are_not_counted_and_get_no_absent_objects():
    table = pa.table(
        {
            "uid": ["a", "b", "c"],
            "boxes": [
                json.dumps([{"category": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4]}]),
                "{not json",
                json.dumps([{"category": "blue star", "bbox": [0.5, 0.5, 0.9, 0.9]}]),
            ],
        }
    )
    stage = AbsentObjects(vocabulary=["red circle", "blue star", "green cross"], per_row=5)
    state, _ = stage.from_counts(summed_counts(stage.counts(table, None)), None)
    assert state["rows"] == 2 and stage.describe(state)["most_frequent"] == {"blue star": 1, "red circle": 1}
    assert stage.decide(table, state)[ABSENT_OBJECTS].to_pylist()[1] == []
    assert sorted(stage.decide(table, state)[ABSENT_OBJECTS].to_pylist()[0]) == ["blue star", "green cross"]


def test_settings_that_cannot_work_are_refused_when_the_pipeline_is_built(tmp_path):
    with pytest.raises(ValueError, match="vocabulary: cannot read"):
        AbsentObjects(vocabulary=str(tmp_path / "missing.txt"))
    names = tmp_path / "objects.txt"
    names.write_text("red circle\n\nblue star\n")
    assert AbsentObjects(vocabulary=str(names)).identity() == {"vocabulary": ["blue star", "red circle"]}
    with pytest.raises(ValueError, match="replaces absent_objects"):
        InstructGenerate(boxes_column="boxes", absent_column=ABSENT_OBJECTS, absent_objects=["red circle"])
    with pytest.raises(ValueError, match="needs boxes_column"):
        InstructGenerate(absent_column=ABSENT_OBJECTS)


def test_without_a_vocabulary_every_row_gets_an_empty_list():
    table = _pool(20)
    stage = AbsentObjects(vocabulary=None)
    assert stage.input_columns == ("uid",)
    assert _decided(stage, table)[ABSENT_OBJECTS].to_pylist() == [[]] * 20


def test_presence_records_ask_for_a_word_and_are_built_from_the_boxes_by_every_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("UNUSED_KEY", "x")
    table = _decided(AbsentObjects(vocabulary=object_names()), _pool(40))
    stage = InstructGenerate(response_types=["presence"], boxes_column="boxes", absent_column=ABSENT_OBJECTS)
    stage.setup()
    asked = Counter()
    for boxes, records in zip(table["boxes"].to_pylist(), stage(table)[INSTRUCTIONS].to_pylist()):
        (record,) = records
        assert record["response_type"] == "presence" and record["model"] == "grounded"
        present = {b["category"] for b in json.loads(boxes)}
        turns = [t["value"] for t in record["conversations"]]
        for question, answer in zip(turns[::2], turns[1::2]):
            name = re.search(r"Is there an? (.+) in the image\? Answer yes or no\.$", question).group(1)
            assert answer == ("Yes." if name in present else "No.")
            asked[answer] += 1
    assert asked["Yes."] == asked["No."] > 40
    # A backend that asks a model still builds these from the boxes: no request is made for them.
    remote = InstructGenerate(
        backend="openai",
        response_types=["presence"],
        boxes_column="boxes",
        absent_column=ABSENT_OBJECTS,
        endpoint={"base_url": "http://127.0.0.1:9/v1", "model": "none", "api_key_env": "UNUSED_KEY"},
        cache=str(tmp_path / "cache.sqlite"),
    )
    remote.setup()
    assert remote(table)[INSTRUCTIONS].to_pylist() == stage(table)[INSTRUCTIONS].to_pylist()


def test_a_row_with_nothing_to_ask_fails_its_presence_record_only():
    table = pa.table(
        {"uid": ["a"], "caption": ["an empty grey picture"], "boxes": ["[]"], ABSENT_OBJECTS: [["red circle"]]}
    )
    stage = InstructGenerate(
        response_types=["conversation", "presence"], boxes_column="boxes", absent_column=ABSENT_OBJECTS
    )
    stage.setup()
    out = stage(table)
    assert [r["response_type"] for r in out[INSTRUCTIONS].to_pylist()[0]] == ["conversation"]
    assert out["instruction_failures"].to_pylist()[0][0]["reason"] == "no_objects"
    with pytest.raises(ValueError, match="response type presence"):
        InstructGenerate(response_types=["presence"], boxes_column="boxes")
