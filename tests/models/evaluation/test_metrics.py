"""The evaluation math on hand-made embeddings and scores: prototypes, top-k, recall, AUC; templates."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import (
    TEMPLATES,
    class_prototypes,
    derangement,
    fill_templates,
    pair_auc,
    per_class_accuracy,
    prettify_classname,
    recall_at_k,
    retrieval_ranks,
    roc_auc,
    topk_accuracy,
)


def test_prototypes_normalise_each_prompt_before_averaging():
    prompts = np.array([[[3.0, 0.0], [0.0, 2.0]], [[0.0, -5.0], [0.0, -1.0]]])
    got = class_prototypes(prompts)
    np.testing.assert_allclose(got, [[2**-0.5, 2**-0.5], [0.0, -1.0]], atol=1e-6)
    assert got.dtype == np.float32


def test_topk_accuracy_and_per_class_with_ties_against_the_true_class():
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.0, 0.0, 0.0],  # label 0: rank 0
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: rank 5
            [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # label 2: all tied -> rank 5
            [0.1, 0.2, 0.3, 0.4, 0.6, 0.5],  # label 3: rank 3
        ]
    )
    labels = np.array([0, 5, 2, 3])
    assert topk_accuracy(scores, labels, ks=(1, 4, 5, 6)) == {1: 0.25, 4: 0.5, 5: 0.5, 6: 1.0}
    accuracy, counts = per_class_accuracy(scores, labels, n_classes=6)
    assert counts.tolist() == [1, 0, 1, 1, 0, 1]
    assert accuracy[0] == 1.0 and accuracy[2] == 0.0 and np.isnan(accuracy[1])


def test_retrieval_ranks_on_a_hand_made_similarity_matrix():
    text_to_image = np.array([0, 0, 1, 2])  # image 0 has two captions
    similarity = np.array(
        [
            [0.9, 0.1, 0.5, 0.2],  # best own caption (0.9) beats every other caption: rank 0
            [0.8, 0.3, 0.4, 0.1],  # own caption 0.4, one other caption above: rank 1
            [0.2, 0.2, 0.2, 0.2],  # all tied: the three other captions count above: rank 3
        ]
    )
    image_ranks, text_ranks = retrieval_ranks(similarity, text_to_image)
    assert image_ranks.tolist() == [0, 1, 3]
    assert text_ranks.tolist() == [0, 2, 1, 1]  # text 3 ties image 0 with its own image 2
    assert recall_at_k(image_ranks, (1, 2, 4)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 4: 1.0})
    assert recall_at_k(text_ranks, (1, 2, 3)) == {1: 0.25, 2: 0.75, 3: 1.0}


def test_retrieval_ranks_need_a_text_for_every_image():
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_ranks(np.zeros((3, 2)), np.array([0, 1]))


def test_auc_hand_computed_values_with_ties():
    assert roc_auc([0.9, 0.8, 0.5], [0.5, 0.3]) == pytest.approx(5.5 / 6)  # one tie counts a half
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 2, 3, 4], [1, 2, 3, 4]) == 0.5
    assert roc_auc([7, 7], [7, 7, 7]) == 0.5


def test_auc_matches_counting_every_pair():
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 6, 40), rng.integers(0, 5, 30)  # many ties
    pairs = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    assert roc_auc(positive, negative) == pytest.approx(pairs.mean())


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 101):
        mapping = derangement(n, seed=n)
        assert sorted(mapping.tolist()) == list(range(n)) and (mapping != np.arange(n)).all()
    assert derangement(50, seed=1).tolist() == derangement(50, seed=1).tolist()
    assert derangement(50, seed=1).tolist() != derangement(50, seed=2).tolist()


def test_pair_auc_is_one_for_matching_embeddings_and_half_for_unrelated_ones():
    images = np.eye(4)
    text_to_image = np.array([0, 1, 2, 3, 3])
    assert pair_auc(images, images[text_to_image], text_to_image)["auc"] == 1.0
    constant = np.tile([[1.0, 0.0, 0.0, 0.0]], (4, 1))
    result = pair_auc(constant, constant[text_to_image], text_to_image)
    assert result == {"auc": 0.5, "mean_true_score": 1.0, "mean_shuffled_score": 1.0}


def test_templates_are_varied_and_fill_the_prettified_name():
    assert 15 <= len(TEMPLATES) <= 20 and len(set(TEMPLATES)) == len(TEMPLATES)
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert prettify_classname("  golden_retriever__dog ") == "golden retriever dog"
    assert fill_templates("sea_lion", ["a photo of a {}.", "{}!"]) == ["a photo of a sea lion.", "sea lion!"]
