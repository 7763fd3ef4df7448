"""BLEU-4 and CIDEr-D against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import pytest

from models.evaluation.caption_metrics import bleu4, cider_d, ngrams, words


def test_words_lowercase_and_split_on_punctuation():
    assert words("A dog's ball, RED!") == ["a", "dog's", "ball", "red"]
    assert ngrams(["a", "b", "a", "b"], 2) == {("a", "b"): 2, ("b", "a"): 1}


def test_bleu4_of_a_partial_match_is_the_geometric_mean_of_clipped_precisions():
    # the/cat/sat/on/mat of 6 unigrams (one "the" clipped), 3 of 5 bigrams, 2 of 4 trigrams, 1 of 3 4-grams.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected)


def test_bleu4_brevity_penalty_uses_the_closest_reference_length():
    assert bleu4(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(1 - 6 / 4))
    # References of 9 and 5 words: 5 is closest to 4, so the penalty is exp(1 - 5/4).
    refs = [["the cat sat on the mat by the door", "the cat sat on it"]]
    assert bleu4(["the cat sat on"], refs) == pytest.approx(math.exp(1 - 5 / 4))


def test_bleu4_is_pooled_over_the_corpus_not_averaged_per_caption():
    candidates = ["a b c d", "e f g h i"]
    references = [["a b c d"], ["e f g x y"]]
    # Pooled: unigrams 4+3 of 4+5, bigrams 3+2 of 3+4, trigrams 2+1 of 2+3, 4-grams 1+0 of 1+2.
    expected = (7 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25
    assert bleu4(candidates, references) == pytest.approx(expected)


def test_bleu4_is_zero_without_any_four_gram_match():
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0


def test_cider_d_of_captions_equal_to_their_only_reference():
    # Disjoint captions: every n-gram has document frequency 1 of 2 images, so all weights are log 2 and
    # each n whose vector is non-empty has cosine 1: 3 of 4 orders for 3 words, all 4 for 4 words.
    score = cider_d(["a red ball", "two green dogs run"], [["a red ball"], ["two green dogs run"]])
    assert score == pytest.approx((10 * 3 / 4 + 10 * 4 / 4) / 2)


def test_cider_d_clips_repeated_words_and_damps_length_differences():
    # Image 1: "a dog dog" against "a dog". Unigram cosine 2/sqrt(10) (tf 1 and 2 against 1 and 1, the
    # second clipped to 1), bigram cosine 1/sqrt(2), no trigram in the reference, length gap 1.
    # Image 2 matches its reference exactly on both of its orders.
    first = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    score = cider_d(["a dog dog", "the cat"], [["a dog"], ["the cat"]])
    assert score == pytest.approx((first + 10 * 2 / 4) / 2)


def test_cider_d_is_zero_when_every_n_gram_is_in_every_image():
    # Document frequency = number of images: the TF-IDF weights vanish (as in the COCO toolkit).
    assert cider_d(["a dog", "a dog"], [["a dog"], ["a dog"]]) == 0.0


@pytest.mark.parametrize("metric", [bleu4, cider_d])
def test_mismatched_inputs_are_errors(metric):
    with pytest.raises(ValueError, match="candidates for"):
        metric(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        metric(["a"], [[]])
