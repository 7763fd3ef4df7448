"""The POPE-style probe: balanced questions per setting, answers parsed, scores from the confusion counts."""

from __future__ import annotations

import json

import pytest

from models.evaluation.pope import BoxedImageSet, ProbeQuestion, parse_yes_no, probe_questions, probe_scores

OBJECTS = [
    frozenset({"dog", "frisbee"}),
    frozenset({"dog", "ball"}),
    frozenset({"cat"}),
    frozenset({"dog", "frisbee", "person"}),
    frozenset({"car", "person"}),
]


@pytest.mark.parametrize("setting", ["random", "popular", "adversarial"])
def test_questions_are_balanced_and_true_to_the_boxes(setting):
    questions = probe_questions(OBJECTS, setting, per_image=2, seed=1)
    for index, names in enumerate(OBJECTS):
        mine = [q for q in questions if q.image == index]
        present = [q for q in mine if q.present]
        assert len(present) == min(2, len(names)) == len(mine) - len(present)
        assert all((q.category in names) == q.present for q in mine)
    assert probe_questions(OBJECTS, setting, per_image=2, seed=1) == questions


def test_popular_absent_objects_are_the_most_frequent_ones():
    questions = probe_questions(OBJECTS, "popular", per_image=1)
    cat = [q.category for q in questions if q.image == 2 and not q.present]
    assert cat == ["dog"]  # in 3 of 5 images


def test_adversarial_absent_objects_co_occur_with_the_present_ones():
    questions = probe_questions(OBJECTS, "adversarial", per_image=1)
    # Image 1 has dog and ball; frisbee appears with dog twice, person once, cat and car never.
    assert [q.category for q in questions if q.image == 1 and not q.present] == ["frisbee"]


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="setting must be one of"):
        probe_questions(OBJECTS, "hard")


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("Yes.", True),
        ("no, there is not", False),
        (" YES it is", True),
        ("There is a dog.", None),
        ("", None),
        ("nothing", None),
    ],
)
def test_replies_are_read_from_their_first_word(reply, answer):
    assert parse_yes_no(reply) is answer


def test_scores_count_unanswered_replies_as_wrong():
    questions = [
        ProbeQuestion(0, "dog", True, "random"),
        ProbeQuestion(0, "cat", False, "random"),
        ProbeQuestion(1, "car", True, "random"),
        ProbeQuestion(1, "kite", False, "random"),
    ]
    scores = probe_scores(questions, ["yes", "yes", "maybe", "no"])
    assert scores["accuracy"] == 0.5 and scores["unanswered"] == 1
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    assert scores["yes_ratio"] == 0.5
    always_yes = probe_scores(questions, ["yes"] * 4)
    assert always_yes["accuracy"] == 0.5 and always_yes["yes_ratio"] == 1.0 and always_yes["recall"] == 1.0


def test_boxed_set_reads_instances_or_objects_and_lists_what_it_skips(tmp_path):
    rows = [
        {"image": "a.jpg", "instances": [{"category": "Dog", "bbox": [0, 0, 1, 1]}, {"category": "cat"}]},
        {"image": "b.jpg", "objects": ["car"]},
        {"image": "c.jpg", "instances": []},
        "not json",
    ]
    path = tmp_path / "probe.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    boxed = BoxedImageSet(path)
    assert boxed.images == ["a.jpg", "b.jpg"] and boxed.objects == [frozenset({"dog", "cat"}), frozenset({"car"})]
    assert [s.reason.split(":")[0] for s in boxed.skipped] == ["probe.jsonl", "invalid JSON"]
    assert boxed.images_dir == tmp_path / "images"
