"""The tables that ``curation_value.py`` prints: the curated run's stages, where each kind of row
went, raw vs curated vs oracle with the gap closed, and the per-stage ablation."""

from __future__ import annotations

import math
import statistics
from collections import Counter

import numpy as np

from benchmarks._real_pairs import METRICS


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def means(results: list[dict]) -> dict[str, float]:
    """Each metric's mean over seeds."""
    return {key: mean_sd([r[key] for r in results])[0] for key in METRICS}


def gap_closed(raw: list[dict], curated: list[dict], oracle: list[dict]) -> dict[str, float]:
    """Per metric, ``(curated - raw) / (oracle - raw)`` of the means over seeds (nan where oracle = raw)."""
    r, c, o = means(raw), means(curated), means(oracle)
    return {key: (c[key] - r[key]) / (o[key] - r[key]) if o[key] != r[key] else math.nan for key in METRICS}


def print_stages(manifest) -> None:
    """Rows in, kept and rejected (by reason) per stage of a run, and its global stages' summaries."""
    print(f"{'stage':<24}{'in':>7}{'kept':>7}  rejected")
    for phase in manifest.phases:
        for name, c in phase.counts.items():
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(c.rejected.items(), key=lambda x: -x[1]))
            print(f"{name:<24}{c.rows_in:>7,}{c.rows_kept:>7,}  {reasons}")
    for name, summary in manifest.aggregates.items():
        facts = [
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary.items()
            if isinstance(v, (int, float, str)) or v is None
        ]
        print(f"{name}: " + ", ".join(facts))


def print_where(table: dict[str, Counter], manifest, kinds: list[str]) -> None:
    """Per kind of row: pool, kept and rejected by each stage that rejected something."""
    stages = [name for phase in manifest.phases for name in phase.counts if any(c[name] for c in table.values())]
    short = {
        s: s.replace("caption_", "").replace("_duplicates", "_dup").replace("clip_score_", "clip_")[:12] for s in stages
    }
    print(f"{'kind':<16}{'pool':>6}{'kept':>6}{'/epoch':>7}" + "".join(f"{short[s]:>13}" for s in stages))
    for kind in kinds:
        c = table[kind]
        print(f"{kind:<16}{c['pool']:>6}{c['kept']:>6}{c['per_epoch']:>7.0f}" + "".join(f"{c[s]:>13}" for s in stages))


def print_score_auc(scores: dict[str, list[float]]) -> None:
    """ROC AUC of the CLIP score of clean rows against each other kind."""
    from models.evaluation import roc_auc

    clean = scores.get("clean", [])
    aucs = {
        k: roc_auc(np.asarray(clean), np.asarray(v)) if clean and v else math.nan
        for k, v in scores.items()
        if k != "clean"
    }
    print("CLIP score (score model) of clean rows vs: " + ", ".join(f"{k} AUC {a:.3f}" for k, a in aucs.items()))


def print_summary(
    results: dict[str, list[dict]], chance: dict[str, float], score_eval: dict, gaps: dict[str, float]
) -> None:
    """Raw, curated and oracle (mean ± sd over seeds), the gap closed and the CLIP-score model, per metric."""
    arms = ("raw", "curated", "oracle")
    print(f"{'metric':<14}{'chance':>8}" + "".join(f"{a:>18}" for a in arms) + f"{'gap closed':>12}{'score model':>13}")
    for key in METRICS:
        cells = "".join("{:>10.3f} ± {:.3f}".format(*mean_sd([r[key] for r in results[a]])) for a in arms)
        print(f"{key:<14}{chance[key]:>8.3f}{cells}{gaps[key]:>12.2f}{score_eval[key]:>13.3f}")


def print_ablation(results: dict[str, list[dict]], counts: dict[str, dict[str, int]], default: str) -> None:
    """Per arm: rows, clean rows and noise rows kept (per epoch where rows carry keep probabilities);
    each metric's mean and its difference from ``default``."""
    reference = means(results[default])
    print(f"{'arm':<30}{'rows':>7}{'clean':>7}{'noise':>7}{'/epoch':>7}" + "".join(f"{k:>16}" for k in METRICS))
    for arm, arm_results in results.items():
        values = means(arm_results)
        cells = "".join(f"{values[k]:>8.3f} {values[k] - reference[k]:+.3f}" for k in METRICS)
        c = counts[arm]
        print(f"{arm:<30}{c['rows']:>7,}{c['clean']:>7,}{c['noise']:>7,}{c['per_epoch']:>7,}{cells}")
