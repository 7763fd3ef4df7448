"""A CLIP-score cut calibrated on the pool itself, against the scores of pairs known to be wrong.

A fixed top fraction keeps 70% of a clean pool and 70% of a dirty one. :class:`ClipScoreNullCut`
asks the model instead what a mismatched pair scores here: each shard's captions are paired
with the images of other rows of the same shard (a seeded derangement), which is what a
mismatched web pair is, a real caption beside an image it does not describe. The pool's
scores are then read as a two-group mixture (Efron's), ``f = pi0 * f0 + (1 - pi0) * f1``,
with ``f0`` the measured null density and ``pi0`` the share of mismatched pairs:

- ``pi0`` is Storey's estimate: the share of pool scores below the null's ``a``-quantile, over
  ``a``, at most 1. Every matched pair that scores that low counts as noise, so it errs high, the
  more so the higher the quantile and the weaker the model (at the null's median, a score model
  that is weak on part of the pool doubled the noise share of the issue-21 benchmark's large
  pool). ``a`` is chosen from 0.05 to 0.95 by Storey, Taylor & Siegmund's (2004) bootstrap: the
  tail whose estimate has the least mean squared error around the lowest estimate of all tails,
  over resamples of both histograms (bias traded against the variance of a thin tail).
- The cutoff is the lowest score from which up every score is more likely matched than not:
  its local false discovery rate ``pi0 * f0(s) / f(s)`` stays below ``max_local_fdr`` (0.5
  is the Bayes decision when keeping a wrong pair costs as much as losing a right one). Both
  densities come from histograms smoothed with a Gaussian kernel (Silverman's bandwidth).
  Or, with ``null_quantile`` set, the ``q``-quantile of the null: at most ``1 - q`` of the
  mismatched pairs pass, whatever the clean rows cost.

With ``online: true`` the stage weighs instead of cutting: each row keeps the probability that
its pair is matched, ``1 - lfdr(s)`` made non-decreasing in the score (isotonic regression), as
its ``keep_probability`` (multiplied into any earlier stage's, e.g. online MetaCLIP balancing),
and the bundled trainers draw each epoch's rows from it. Summed over rows, a gradient weighted
by that probability is the expected gradient of the matched rows alone, where a hard cut drops
every matched pair the model scores low (the rarer concepts, on a weak score model) and keeps
every mismatched pair it scores high. Rows below ``min_match_probability`` are still rejected.

A clean pool gets ``pi0`` near 0 and loses (almost) nothing; a pool that is half noise gets a
high cutoff. Each shard's two histograms are summed bin by bin (a sum by key on the cluster), so
the driver holds 2 x 4,000 counts whatever the pool's size. The summary records the estimated
noise share, the cutoff and the expected share of mismatched pairs among the kept rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.optimize import isotonic_regression

from pipelines.stage import COUNT, KEY, Cutoff, Rejections, SummedStage
from schemas.columns import CLIP_SCORE, IMAGE_EMBEDDING, KEEP_PROBABILITY, TEXT_EMBEDDING, UID
from schemas.embeddings import embedding_matrix

BELOW_NULL_CUT = "clip_score_below_null_cut"
BINS = 4000  # over [-1, 1]: 0.0005 wide, far below any score difference that matters
SAME_IMAGE = 0.95  # null pairs whose two images are this close are skipped: the caption may fit
NULL_TAILS = np.linspace(0.05, 0.95, 19)  # the null quantiles Storey's estimate may count below
BOOTSTRAPS = 200


@dataclass
class ClipScoreNullCut(SummedStage):
    """Keeps rows whose ``clip_score`` beats what mismatched pairs of the same pool score.

    ``max_local_fdr`` (default) or ``null_quantile``: set exactly one. ``seed`` fixes which
    captions each shard's images are paired with for the null. ``online``: keep each row with its
    match probability as ``keep_probability`` instead of cutting (rows below
    ``min_match_probability`` are rejected).
    """

    name: ClassVar[str] = "clip_score_null_cut"
    input_columns: ClassVar[tuple[str, ...]] = (CLIP_SCORE,)

    max_local_fdr: float | None = 0.5
    null_quantile: float | None = None
    seed: int = 0
    online: bool = False
    min_match_probability: float = 0.05

    def __post_init__(self) -> None:
        if (self.max_local_fdr is None) == (self.null_quantile is None):
            raise ValueError("set exactly one of max_local_fdr and null_quantile (the other to null)")
        if self.online and self.null_quantile is not None:
            raise ValueError("online weighs rows by their local fdr: use it with max_local_fdr, not null_quantile")
        for key in ("max_local_fdr", "null_quantile", "min_match_probability"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{key} must be between 0 and 1, got {value}")

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return (UID, CLIP_SCORE, IMAGE_EMBEDDING, TEXT_EMBEDDING)

    @property
    def output_columns(self) -> tuple[str, ...]:
        return (KEEP_PROBABILITY,) if self.online else ()

    def counts(self, batch: pa.Table, state: Any) -> pa.Table:
        """One shard's pool and null histograms as counts: bins of the pool's scores under keys
        0..BINS-1, of the null's under BINS..2*BINS-1 (empty bins left out)."""
        scored = batch.filter(pc.is_valid(batch[CLIP_SCORE]))
        scores = scored[CLIP_SCORE].to_numpy().astype(np.float64)
        embedded = scored.filter(pc.and_(pc.is_valid(scored[IMAGE_EMBEDDING]), pc.is_valid(scored[TEXT_EMBEDDING])))
        first = embedded[UID][0].as_py() if embedded.num_rows else ""
        images = embedding_matrix(embedded, None).astype(np.float32)
        texts = embedding_matrix(embedded, images.shape[1], TEXT_EMBEDDING).astype(np.float32)
        both = np.concatenate([histogram(scores), histogram(null_scores(images, texts, f"{self.seed}:{first}"))])
        keys = np.flatnonzero(both)
        return pa.table({KEY: pa.array(keys, pa.int64()), COUNT: pa.array(both[keys], pa.int64())})

    def from_counts(self, totals: pa.Table, state: Any) -> tuple[Any, bool]:
        both = np.zeros(2 * BINS, np.int64)
        both[totals[KEY].to_numpy()] = totals[COUNT].to_numpy()
        pool, null = both[:BINS], both[BINS:]
        state = calibrate(
            pool,
            null,
            max_local_fdr=self.max_local_fdr,
            null_quantile=self.null_quantile,
            seed=self.seed,
            min_match_probability=self.min_match_probability if self.online else None,
        )
        return state, True

    def decide(self, batch: pa.Table, state: Any) -> pa.Table:
        scores = batch[CLIP_SCORE]
        rejections = Rejections(batch.num_rows)
        if self.online:
            chance = score_probability(scores, state.get("match_probability"))
            rejections.add(
                pa.array(chance < self.min_match_probability),
                BELOW_NULL_CUT,
                f"match probability below {self.min_match_probability:g} "
                f"(estimated noise share {state['noise_share']:.1%})",
            )
            return rejections.attach(pa.table({KEEP_PROBABILITY: pa.array(chance, pa.float32())}))
        cutoff = state["cutoff"]
        below = pc.fill_null(pc.less(scores, pa.scalar(cutoff, pa.float32())), True)
        rejections.add(
            below,
            BELOW_NULL_CUT,
            f"clip_score below {cutoff:.4f}, where mismatched pairs become as likely as matched ones "
            f"(estimated noise share {state['noise_share']:.1%})",
        )
        return rejections.attach(batch.select([]))

    def describe(self, state: Any) -> dict[str, Any]:
        return {k: v for k, v in state.items() if k != "match_probability"}

    def card_notes(self, view: Any) -> str | None:
        summary = view.summary
        if not summary or not summary.get("null_pairs"):
            return None
        kept_share = summary.get("mismatched_kept_share")
        if summary.get("rule") == "online" and kept_share is not None:
            return (
                f"Estimated share of mismatched pairs among the {summary['rows_scored']:,} scored rows: "
                f"**{summary['noise_share']:.1%}** (the same model scored {summary['null_pairs']:,} pairs of "
                f"captions shuffled within shards: median {summary['null_median']:.3f}). Online: every row "
                f"keeps its match probability as its keep probability; {summary['rows_kept_expected']:,} rows "
                f"have one of at least {self.min_match_probability:g} (score {summary['cutoff']:.4f} and up), "
                f"an epoch draws about {summary['rows_per_epoch_expected']:,} of them, and about "
                f"{kept_share:.1%} of those may still be mismatched (all rows: {summary['noise_share']:.1%})."
            )
        return (
            f"Estimated share of mismatched pairs among the {summary['rows_scored']:,} scored rows: "
            f"**{summary['noise_share']:.1%}** (the same model scored {summary['null_pairs']:,} pairs of "
            f"captions shuffled within shards: median {summary['null_median']:.3f}). Cutoff "
            f"{summary['cutoff']:.4f} ({summary['rule'].replace('_', ' ')}): {summary['rows_kept_expected']:,} "
            f"rows at or above it; {summary['null_share_above_cutoff']:.1%} of the shuffled pairs score that "
            f"high, so about {kept_share:.1%} of the kept rows may still be mismatched."
            if kept_share is not None
            else f"Estimated share of mismatched pairs: **{summary['noise_share']:.1%}**; no row kept."
        )

    def cutoffs(self, summary: Any) -> list[Cutoff]:
        if not summary or summary.get("cutoff") is None or summary["cutoff"] <= -1.0:
            return []  # no cut (online weighing that rejected nothing, or nothing scored)
        if self.online:
            rule = f"match probability >= {self.min_match_probability:g}"
        elif self.null_quantile is not None:
            rule = f"null {self.null_quantile:.0%} quantile"
        else:
            rule = f"local fdr < {self.max_local_fdr:g}"
        return [Cutoff(CLIP_SCORE, summary["cutoff"], f"null-calibrated cutoff ({rule})")]


def null_scores(images: np.ndarray, texts: np.ndarray, seed: str) -> np.ndarray:
    """Cosines of each image with another row's caption (a seeded derangement of the rows).

    Pairs whose two images are near-identical are left out: the other caption may well fit."""
    rows = len(images)
    if rows < 2:
        return np.zeros(0)
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "little"))
    order = rng.permutation(rows)
    partner = np.empty(rows, np.int64)
    partner[order] = np.roll(order, -int(rng.integers(1, rows)))
    same_image = np.einsum("ij,ij->i", images, images[partner]) >= SAME_IMAGE
    scores = np.einsum("ij,ij->i", images, texts[partner]).astype(np.float64)
    return scores[~same_image]


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The bin of each score among :data:`BINS` equal bins over [-1, 1] (values outside are clipped)."""
    return np.clip(((np.asarray(scores, np.float64) + 1.0) / 2.0 * BINS).astype(np.int64), 0, BINS - 1)


def histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of ``scores`` in the :func:`score_bins`."""
    return np.bincount(score_bins(scores), minlength=BINS).astype(np.int64)


def calibrate(
    pool: np.ndarray,
    null: np.ndarray,
    *,
    max_local_fdr: float | None = 0.5,
    null_quantile: float | None = None,
    seed: int = 0,
    min_match_probability: float | None = None,
) -> dict[str, Any]:
    """The cutoff and the evidence behind it, from the pool's and the null's score histograms.

    With ``min_match_probability`` (online weighing) the state also holds each bin's match
    probability, the cutoff is where it reaches that minimum, and the expectations are per epoch.
    """
    rows, null_rows = int(pool.sum()), int(null.sum())
    edges = np.linspace(-1.0, 1.0, BINS + 1)
    online = min_match_probability is not None
    state: dict[str, Any] = {
        "rule": "online" if online else "null_quantile" if null_quantile is not None else "local_fdr",
        "rows_scored": rows,
        "null_pairs": null_rows,
        "noise_share": 0.0,
        "cutoff": -1.0,
    }
    if rows == 0 or null_rows == 0:
        return {**state, "rows_kept_expected": rows, "mismatched_kept_share": None}
    null_cdf = np.cumsum(null) / null_rows
    median_bin = int(np.searchsorted(null_cdf, 0.5))
    noise_share, tail = storey_noise_share(pool, null, seed)
    lfdr = noise_share * _density(null) / np.maximum(_density(pool), 1e-12)
    extra: dict[str, Any] = {}
    if online:
        chance = match_probability(pool, lfdr)
        cutoff_bin = int(np.searchsorted(chance, min_match_probability))
        weights = np.where(np.arange(BINS) >= cutoff_bin, chance, 0.0)
        per_epoch = float((pool * weights).sum())
        mismatched = noise_share * rows * float((null * weights).sum() / null_rows)
        extra = {
            "match_probability": chance,
            "rows_per_epoch_expected": int(round(per_epoch)),
            "mismatched_kept_share": round(min(1.0, mismatched / per_epoch), 4) if per_epoch else None,
        }
    elif null_quantile is not None:
        cutoff_bin = int(np.searchsorted(null_cdf, null_quantile)) + 1
    else:
        crossing = np.flatnonzero((lfdr >= max_local_fdr) & (pool > 0))
        cutoff_bin = int(crossing[-1]) + 1 if len(crossing) else int(np.flatnonzero(pool)[0])
    cutoff_bin = min(cutoff_bin, BINS)
    kept = int(pool[cutoff_bin:].sum())
    null_above = float(null[cutoff_bin:].sum() / null_rows)
    return {
        **state,
        "noise_share": round(noise_share, 4),
        "noise_share_null_tail": round(tail, 2),
        "cutoff": float(edges[cutoff_bin]),
        "null_median": float(edges[median_bin]),
        "null_share_above_cutoff": round(null_above, 4),
        "rows_kept_expected": kept,
        "mismatched_kept_share": round(min(1.0, noise_share * rows * null_above / kept), 4) if kept else None,
        **extra,
    }


def match_probability(pool: np.ndarray, lfdr: np.ndarray) -> np.ndarray:
    """Per bin, the chance that a pair scoring there is matched: ``1 - lfdr`` (at least 0), made
    non-decreasing in the score by isotonic regression weighted by the pool's rows, so noise in
    the density estimates never ranks a lower score above a higher one; bins without pool rows
    take the value of their populated neighbours."""
    filled = np.flatnonzero(pool)
    if not len(filled):
        return np.ones(BINS)
    raw = 1.0 - np.minimum(lfdr[filled], 1.0)
    fitted = isotonic_regression(raw, weights=pool[filled].astype(np.float64), increasing=True).x
    return np.clip(np.interp(np.arange(BINS), filled, fitted), 0.0, 1.0)


def score_probability(scores: pa.ChunkedArray | pa.Array, chance: np.ndarray) -> np.ndarray:
    """Each score's match probability from the per-bin table (0 for a missing score)."""
    values = pc.fill_null(scores, np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(np.isnan(values), 0.0, chance[score_bins(np.nan_to_num(values))])


def storey_noise_share(pool: np.ndarray, null: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The share of mismatched pairs (Storey's pi0) from the pool's and the null's histograms, and
    the null tail it was counted in (see the module docstring)."""
    estimates = _tail_estimates(pool[None], null[None])[0]
    rng = np.random.default_rng(seed)
    resampled = _tail_estimates(
        rng.multinomial(int(pool.sum()), pool / pool.sum(), BOOTSTRAPS),
        rng.multinomial(int(null.sum()), null / null.sum(), BOOTSTRAPS),
    )
    error = ((resampled - estimates.min()) ** 2).mean(axis=0)
    best = int(np.argmin(error))
    return float(estimates[best]), float(NULL_TAILS[best])


def _tail_estimates(pools: np.ndarray, nulls: np.ndarray) -> np.ndarray:
    """Per histogram pair (rows) and null tail (columns): the pool's share below the bin where the
    null's cumulative share reaches the tail, over the null's share there (both through that bin)."""
    pool_cdf = np.cumsum(pools, axis=1) / pools.sum(axis=1, keepdims=True)
    null_cdf = np.cumsum(nulls, axis=1) / nulls.sum(axis=1, keepdims=True)
    estimates = np.empty((len(pools), len(NULL_TAILS)))
    for row in range(len(pools)):
        bins = np.searchsorted(null_cdf[row], NULL_TAILS)
        estimates[row] = pool_cdf[row, bins] / null_cdf[row, bins]
    return np.minimum(estimates, 1.0)


def _density(counts: np.ndarray) -> np.ndarray:
    """``counts`` smoothed with a Gaussian kernel of Silverman's bandwidth, as a density per bin."""
    total = counts.sum()
    centres = np.arange(BINS) + 0.5
    mean = (counts * centres).sum() / total
    spread = np.sqrt((counts * (centres - mean) ** 2).sum() / total)
    cdf = np.cumsum(counts) / total
    iqr = np.searchsorted(cdf, 0.75) - np.searchsorted(cdf, 0.25)
    scale = min(spread, iqr / 1.34) if iqr > 0 else spread
    bandwidth = max(0.9 * scale * total ** (-0.2), 1.0)  # in bins
    offsets = np.arange(-int(4 * bandwidth), int(4 * bandwidth) + 1)
    kernel = np.exp(-0.5 * (offsets / bandwidth) ** 2)
    return np.convolve(counts, kernel / kernel.sum(), mode="same") / total
