"""The null-calibrated CLIP-score cut: noise estimate and cutoff on pools with known noise."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from curation.clip_score_null import BINS, ClipScoreNullCut, calibrate, histogram, null_scores, storey_noise_share
from pipelines.engine.keyed import summed_counts
from pipelines.stage import COUNT, KEY
from schemas.columns import CLIP_SCORE, IMAGE_EMBEDDING, KEEP_PROBABILITY, TEXT_EMBEDDING, UID
from schemas.rejects import REJECT_REASON


def _mixture(noise: float, rows: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool scores (mismatched ~ N(0.10, 0.03), matched ~ N(0.30, 0.04)), which rows are noise,
    and a null sample drawn like the mismatched rows."""
    rng = np.random.default_rng(seed)
    is_noise = rng.random(rows) < noise
    scores = np.where(is_noise, rng.normal(0.10, 0.03, rows), rng.normal(0.30, 0.04, rows))
    return scores, is_noise, rng.normal(0.10, 0.03, rows)


@pytest.mark.parametrize("noise", [0.1, 0.3, 0.6])
def test_noise_share_is_estimated_and_the_cut_keeps_matched_rows(noise):
    scores, is_noise, null = _mixture(noise)
    state = calibrate(histogram(scores), histogram(null))
    assert state["noise_share"] == pytest.approx(noise, abs=0.03)
    kept = scores >= state["cutoff"]
    assert kept[~is_noise].mean() > 0.97  # matched rows survive
    assert kept[is_noise].mean() < 0.03  # mismatched ones do not
    assert state["rows_kept_expected"] == int(kept.sum())
    assert state["mismatched_kept_share"] < 0.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_noise_share_is_counted_in_a_null_tail_that_matched_pairs_rarely_reach(seed):
    """Matched pairs that overlap the null's upper half inflate the estimate at the null's median
    (0.31-0.33 here for a true 0.25); the bootstrap picks a lower tail of the null."""
    rng = np.random.default_rng(seed)
    is_noise = rng.random(20_000) < 0.25
    scores = np.where(is_noise, rng.normal(0.10, 0.03, 20_000), rng.normal(0.15, 0.03, 20_000))
    null = rng.normal(0.10, 0.03, 20_000)
    at_median = 2 * (scores < np.median(null)).mean()
    share, tail = storey_noise_share(histogram(scores), histogram(null), seed=seed)
    assert at_median > 0.3 and share == pytest.approx(0.25, abs=0.025) and tail < 0.5
    assert calibrate(histogram(scores), histogram(null), seed=seed)["noise_share"] == pytest.approx(share, abs=1e-4)


def test_a_clean_pool_loses_almost_nothing():
    scores, _, null = _mixture(0.0)
    state = calibrate(histogram(scores), histogram(null))
    assert state["noise_share"] < 0.01
    assert (scores >= state["cutoff"]).mean() > 0.995


def test_the_cut_moves_with_the_noise_share():
    """Where the groups overlap, more noise means a higher cutoff: the same score is less credible."""
    rng = np.random.default_rng(1)
    null = rng.normal(0.15, 0.05, 20_000)
    cutoffs = []
    for noise in (0.1, 0.5):
        is_noise = rng.random(20_000) < noise
        scores = np.where(is_noise, rng.normal(0.15, 0.05, 20_000), rng.normal(0.25, 0.05, 20_000))
        cutoffs.append(calibrate(histogram(scores), histogram(null))["cutoff"])
    assert cutoffs[0] < cutoffs[1]


def test_null_quantile_rule_lets_through_the_stated_share_of_the_null():
    scores, is_noise, null = _mixture(0.3)
    state = calibrate(histogram(scores), histogram(null), max_local_fdr=None, null_quantile=0.99)
    assert state["rule"] == "null_quantile"
    assert state["cutoff"] == pytest.approx(np.quantile(null, 0.99), abs=0.002)
    assert (scores[is_noise] >= state["cutoff"]).mean() == pytest.approx(0.01, abs=0.01)


def test_null_pairs_each_image_with_another_rows_caption_deterministically():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(50, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images.copy()  # every row's own caption is a perfect match (cosine 1)
    scores = null_scores(images, texts, "s")
    assert len(scores) == 50 and scores.max() < 0.99  # nobody kept its own caption
    assert np.array_equal(scores, null_scores(images, texts, "s"))
    assert not np.array_equal(scores, null_scores(images, texts, "t"))
    assert len(null_scores(images[:1], texts[:1], "s")) == 0


def test_null_skips_pairs_of_the_same_image():
    image = np.zeros((4, 3), np.float32)
    image[:, 0] = 1.0  # four copies of one image: any other caption may describe it
    assert len(null_scores(image, image, "s")) == 0


def _table(rows: int, noise: float, seed: int = 3) -> tuple[pa.Table, np.ndarray]:
    """Rows whose text embedding is their image's plus noise, or (mismatched) another random vector's."""
    rng = np.random.default_rng(seed)
    dim = 32
    images = rng.normal(size=(rows, dim))
    is_noise = rng.random(rows) < noise
    texts = np.where(is_noise[:, None], rng.normal(size=(rows, dim)), images + rng.normal(scale=0.8, size=(rows, dim)))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    scores = np.einsum("ij,ij->i", images, texts).astype(np.float32)

    def lists(matrix: np.ndarray) -> pa.Array:
        return pa.array(list(matrix.astype(np.float16)), pa.list_(pa.float16()))

    table = pa.table(
        {
            UID: [f"r{i:05d}" for i in range(rows)],
            CLIP_SCORE: scores,
            IMAGE_EMBEDDING: lists(images),
            TEXT_EMBEDDING: lists(texts),
        }
    )
    return table, is_noise


def test_stage_rejects_the_mismatched_rows_of_a_pool():
    table, is_noise = _table(4_000, noise=0.25)
    stage = ClipScoreNullCut()
    counts = pa.concat_tables([stage.counts(table.slice(i, 1000), None) for i in range(0, 4_000, 1000)])
    state, done = stage.from_counts(summed_counts(counts), None)
    assert done
    assert state["noise_share"] == pytest.approx(0.25, abs=0.05)
    rejected = np.array([r is not None for r in stage.decide(table, state)[REJECT_REASON].to_pylist()])
    assert rejected[is_noise].mean() > 0.9 and rejected[~is_noise].mean() < 0.1
    assert stage.cutoffs(stage.describe(state))[0].value == state["cutoff"]


def test_online_weighs_each_row_by_its_match_probability():
    """Overlapping groups: the weights are the posterior of being matched, so the weighted matched
    rows are what the true posterior gives, and a matched row a hard cut would drop still counts."""
    rng = np.random.default_rng(5)
    rows, noise = 20_000, 0.3
    is_noise = rng.random(rows) < noise
    scores = np.where(is_noise, rng.normal(0.10, 0.04, rows), rng.normal(0.20, 0.05, rows))
    null = rng.normal(0.10, 0.04, rows)
    state = calibrate(histogram(scores), histogram(null), min_match_probability=0.05)
    chance = state["match_probability"]
    assert np.all(np.diff(chance) >= 0) and chance[0] < 0.05 and chance[-1] == pytest.approx(1.0)
    table = pa.table({CLIP_SCORE: pa.array(scores.astype(np.float32))})
    stage = ClipScoreNullCut(online=True)
    decided = stage.decide(table, state)
    weights = decided[KEEP_PROBABILITY].to_numpy()
    rejected = np.array([r is not None for r in decided[REJECT_REASON].to_pylist()])
    assert np.all(weights[rejected] < 0.05) and np.all(weights[~rejected] >= 0.05)
    # the weighted matched rows and the weighted total agree with the truth within a few percent
    true_posterior = (1 - noise) * _normal(scores, 0.20, 0.05)
    true_posterior /= true_posterior + noise * _normal(scores, 0.10, 0.04)
    assert abs(weights[~is_noise].sum() - true_posterior[~is_noise].sum()) < 0.05 * (~is_noise).sum()
    below = scores < calibrate(histogram(scores), histogram(null))["cutoff"]
    assert weights[below & ~is_noise].mean() > 0.2  # matched rows a hard cut drops still count
    assert state["mismatched_kept_share"] < noise / 2
    assert state["rows_per_epoch_expected"] == pytest.approx(weights[~rejected].sum(), rel=0.01)
    notes = stage.card_notes(SimpleNamespace(summary=stage.describe(state)))
    assert "Online" in notes and "match_probability" not in stage.describe(state)
    assert stage.cutoffs(stage.describe(state))[0].value == state["cutoff"] > -1.0
    everything = {**stage.describe(state), "cutoff": -1.0}  # weighing that rejects nothing draws no cut line
    assert stage.cutoffs(everything) == []


def _normal(x: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / sd) ** 2) / sd


def test_a_scored_row_without_embeddings_leaves_the_null_to_the_others():
    table, _ = _table(200, noise=0.0)
    holes = pa.array([None] + table[IMAGE_EMBEDDING].to_pylist()[1:], table.schema.field(IMAGE_EMBEDDING).type)
    damaged = table.set_column(table.schema.get_field_index(IMAGE_EMBEDDING), IMAGE_EMBEDDING, holes)
    counts = ClipScoreNullCut().counts(damaged, None).to_pydict()
    pool = sum(c for k, c in zip(counts[KEY], counts[COUNT]) if k < BINS)
    null = sum(c for k, c in zip(counts[KEY], counts[COUNT]) if k >= BINS)
    assert pool == 200 and null == pytest.approx(199, abs=3)  # a few same-image pairs skipped


def test_settings_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        ClipScoreNullCut(max_local_fdr=0.5, null_quantile=0.9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ClipScoreNullCut(max_local_fdr=1.5)
    with pytest.raises(ValueError, match="online weighs rows"):
        ClipScoreNullCut(max_local_fdr=None, null_quantile=0.9, online=True)


def test_card_notes_state_the_noise_share_and_the_cutoff():
    scores, _, null = _mixture(0.3)
    summary = ClipScoreNullCut().describe(calibrate(histogram(scores), histogram(null)))
    notes = ClipScoreNullCut().card_notes(SimpleNamespace(summary=summary))
    assert f"**{summary['noise_share']:.1%}**" in notes and f"{summary['cutoff']:.4f}" in notes
    assert "may still be mismatched" in notes
