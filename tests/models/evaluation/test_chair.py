import pytest

from models.evaluation.chair import chair_scores, named_objects

VOCABULARY = ["red circle", "blue square", "circle", "green star", "white cross"]


def test_a_caption_names_the_longest_vocabulary_entries_as_whole_words_and_plurals():
    assert named_objects("A red circle beside a circle.", VOCABULARY) == {"red circle", "circle"}
    assert named_objects("two red circles and white crosses", VOCABULARY) == {"red circle", "white cross"}
    assert named_objects("a red circle", VOCABULARY) == {"red circle"}  # not also "circle"
    assert named_objects("a semicircle and a reddish square", VOCABULARY) == set()


def test_chair_counts_hallucinated_objects_per_mention_and_per_caption_and_the_recall():
    captions = ["a red circle to the left of a blue square", "a green star"]
    objects = [frozenset({"red circle"}), frozenset({"green star", "white cross"})]
    scores = chair_scores(captions, objects, VOCABULARY)
    assert scores["named_objects"] == 3
    assert scores["chair_i"] == pytest.approx(1 / 3)  # the blue square is not there
    assert scores["chair_s"] == pytest.approx(1 / 2)
    assert scores["object_recall"] == pytest.approx(2 / 3)  # the white cross is never named


def test_without_a_vocabulary_only_objects_some_image_holds_are_recognised():
    scores = chair_scores(["a blue square"], [frozenset({"red circle"})])
    assert scores["named_objects"] == 0 and scores["chair_i"] == 0.0


def test_captions_and_object_sets_must_pair_up():
    with pytest.raises(ValueError, match="2 captions for 1 object sets"):
        chair_scores(["a", "b"], [frozenset({"x"})])
