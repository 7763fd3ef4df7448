"""Curation value (issues 11, 21): does the LiT CLIP trained on the curated pool beat the one trained on
the raw pool, at equal steps, and how much of the way to a noise-free pool does curation go?

Real pairs from ``../shared/data`` are split three ways by a hash of the image name: held-out
Flickr8k images (evaluation only), a CLIP-score split (Flickr8k and Tux Paint, used only to train
the heads of the score model) and the pool split. The **small** pool (``--pool small``, the
default) is the pool split's real pairs (each Flickr8k image with ``--captions-per-image``
captions, each Tux Paint stamp with its caption) plus injected noise, each row labelled by its kind:

- ``mismatched``: a pool image with another pool image's caption, or with a caption of a Flickr8k
  photo that is not among the 800 with images (text-only list);
- ``spam``: web boilerplate alt-text that no text rule knows ("Click here to enlarge");
- ``junk``: the demo's junk alt-text (file names, dimensions, urls, stock words, empty), one-word,
  overlong and control-character captions;
- ``exact_duplicate``: a row repeated (same url and caption), later in the pool;
- ``image_duplicate``: the same image bytes under another url with the same caption;
- ``near_duplicate``: the image re-encoded, shrunk, cropped or mirrored under another url, with the
  same caption or a lightly edited one;
- ``head``: head-heavy concept: more dog photos of the pool, each paired with captions of other
  Flickr8k dog photos (text-only list), as web pools repeat their common concepts.

The **large** pool (``--pool large``, about 2.5x the rows) adds 4,000 CIFAR-10 test images (400 a
class, served at 128 px) with class-name captions in seeded web alt-text styles ("a photo of a
cat", "Cat for sale - free shipping", "cat hd wallpaper", ...) and noise of the same kinds in the
same shares (mismatched captions from another class or from the text-only list, never naming the
image's class; head rows: Flickr8k dog captions on CIFAR dogs). CIFAR-10 test is split by the
sorted image name within each class: the first 600 of each class are the evaluation's (it reads
the first ``--per-class`` of them, at most 600), the pool takes the next 400 of each class. Both
sizes are evaluated on the same images, so their numbers compare.

The images are served on 127.0.0.1 by a separate process, and the pool goes through the project's
own runner (``pipelines.engine.plan.build_plan`` + ``pipelines.engine.execute.run_pipeline``, what
``vlmcurate run`` calls, on ``--runner``, default Ray) twice: (a) **raw**:
``configs/curation-value.yaml`` with only its Download stage; (b) **curated**: the whole config.
(c) **oracle**: the raw export minus every injected noise row (its clean rows, in export order,
in shards of the export's size); ``--clip-fraction`` and ``--metaclip-threshold`` override the
config's CLIP-score top fraction and MetaCLIP's t. The CLIP-score model is the LiT CLIP with
heads trained by the project's trainer on the CLIP-score split. Each arm's rows then train the
LiT CLIP heads with the same recipe for the same ``--steps`` (equal samples seen: a smaller set
is seen for more epochs), for each of ``--seeds`` seeds (head initialisation and batch order;
the pool and the curation are fixed), and are evaluated zero-shot on CIFAR-10 test and by
retrieval on the held-out Flickr8k images. The final table gives each metric's **gap closed**,
``(curated - raw) / (oracle - raw)`` of the means over seeds.

``--ablation`` adds an arm for the recipe without each stage group, and for each group alone
(with the download), the groups as :mod:`benchmarks._curation_arms` defines them (text rules,
exact duplicates, MetaCLIP match + balance, image size, image duplicates, CLIP score,
near-duplicate pairs), run by ``--ablation-runner`` (default local: in this process, where the
locked image tower's outputs are memoised across arms) while the images are still served, then
trained and evaluated like the others; its table gives each arm's rows, clean and noise rows
kept, and each metric's mean with its difference from the curated (default) arm.
``--limit-rows N`` keeps a random N rows of the pool, for smoke runs only.

    .venv/bin/python benchmarks/curation_value.py [--pool small|large] [--steps 300] [--seeds 3]
        [--ablation] [--ablation-runner local|ray] [--work DIR] [--runner ray|local]
        [--clip-fraction F] [--metaclip-threshold T] [--per-class 100] [--heldout-images 200]
        [--score-steps 300] [--limit-rows N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# OpenMP's spinning barrier makes a step of the heads about 25x slower when other processes compete for
# this VM's 2 cores (measured: 195 ms vs 8 ms for a 1280x256 linear step); passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._curation_arms import (  # noqa: E402
    ablation_configs,
    account,
    arm_config,
    kept,
    memoised_towers,
    run_curation,
    stage_name,
    write_oracle,
)
from benchmarks._curation_cifar import EVAL_PER_CLASS, POOL_PER_CLASS  # noqa: E402
from benchmarks._curation_pool import HEAD_WORD, build_pool, pool_uid, served, subsample, write_pool  # noqa: E402
from benchmarks._curation_report import (  # noqa: E402
    gap_closed,
    means,
    print_ablation,
    print_score_auc,
    print_stages,
    print_summary,
    print_where,
)
from benchmarks._real_pairs import (  # noqa: E402
    METRICS,
    FrozenTowerCache,
    chance,
    evaluate,
    require_shared,
    write_shards,
)

CONFIG = REPO / "configs" / "curation-value.yaml"
#: The score's bar for the gap closed on the worst metric (the issue's "closes >= 50% of the gap").
GAP_BAR = 0.5
#: MetaclipBalance's parameters that derive t, set to null where ``--metaclip-threshold`` fixes it.
T_RULES = ("tail_share", "head_factor")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pool",
        choices=["small", "large"],
        default="small",
        help="small: the real pairs with noise; large: plus CIFAR-10 images (about 2.5x the rows)",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps of each arm (equal steps)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--ablation", action="store_true", help="also the recipe without each stage group, and each group alone"
    )
    parser.add_argument("--ablation-runner", choices=["local", "ray"], default="local")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--score-steps", type=int, default=300, help="training steps of the CLIP-score model")
    parser.add_argument(
        "--clip-fraction", type=float, default=None, help="ClipScoreTopFraction's fraction (default: the config's)"
    )
    parser.add_argument(
        "--metaclip-threshold", type=int, default=None, help="a fixed t instead of the config's tail share"
    )
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--pool-seed", type=int, default=0)
    parser.add_argument("--limit-rows", type=int, default=None, help="a random subset of the pool (smoke runs)")
    parser.add_argument("--per-class", type=int, default=100, help=f"CIFAR-10 images a class, at most {EVAL_PER_CLASS}")
    parser.add_argument("--heldout-images", type=int, default=200)
    parser.add_argument("--runner", choices=["ray", "local"], default="ray")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    if not 1 <= args.per_class <= EVAL_PER_CLASS:
        parser.error(f"--per-class must be 1 to {EVAL_PER_CLASS}: the images after those are the large pool's")
    return args


def curated_config(args: argparse.Namespace, work: Path, pool: Path, metadata: Path, score_model: Path):
    """The config with the benchmark's paths (and ``--clip-fraction``, ``--metaclip-threshold``)."""
    from pipelines.engine.config import load_config

    overrides = [
        f"input={pool}",
        f"output_dir={work / 'runs'}",
        f"runner={args.runner}",
        f"stages.metaclip_match.metadata={metadata}",
        f"stages.clip_preprocess.weights={score_model}",
        f"stages.clip_embed.weights={score_model}",
    ]
    if args.clip_fraction is not None:
        overrides.append(f"stages.clip_score_top_fraction.fraction={args.clip_fraction}")
    config = load_config(args.config, overrides)
    if args.metaclip_threshold is None:
        return config
    balance = next(e for e in config.stages if stage_name(e) == "metaclip_balance")
    other_rules = [f"stages.metaclip_balance.{key}=null" for key in T_RULES if balance.params.get(key) is not None]
    return load_config(
        args.config, overrides + [f"stages.metaclip_balance.threshold={args.metaclip_threshold}", *other_rules]
    )


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent inside to ``timings[key]``."""
    start = time.monotonic()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.monotonic() - start


def train(
    data: Path,
    out: Path,
    steps: int,
    seed: int,
    args: argparse.Namespace,
    towers: FrozenTowerCache,
    cache_from: Path | None = None,
) -> None:
    """Train the LiT heads with the project's recipe (``vlmcurate train clip``'s code).

    The recipe caches the locked towers' outputs once per training set (its own feature cache);
    here its model's image trunk is also memoised per image (:class:`FrozenTowerCache`), so an
    image that an earlier training, evaluation or local curation run in this process already
    encoded is not encoded again. A later seed on the same data starts from the first seed's
    feature cache file, which the recipe accepts as its own.
    """
    import models.training.clip_recipe as recipe

    out.mkdir(parents=True, exist_ok=True)
    if cache_from is not None and (cache_from / "feature_cache-rank0.pt").exists():
        shutil.copy(cache_from / "feature_cache-rank0.pt", out / "feature_cache-rank0.pt")
    with memoised_towers(recipe, towers):
        recipe.train_clip(
            recipe.ClipTrainConfig(
                model="lit-effnet-minilm",
                train_data=[str(data)],
                output_dir=str(out),
                batch_size=args.batch_size,
                max_steps=steps,
                lr=args.lr,
                warmup_steps=20,
                save_every=steps,
                seed=seed,
            )
        )


def train_arm(arm: str, data: Path, args: argparse.Namespace, towers: FrozenTowerCache, work: Path) -> list[dict]:
    """Train an arm's heads for each seed and evaluate each model; the evaluations."""
    from models.clip import load_clip

    results = []
    for seed in range(args.seeds):
        out = work / "train" / f"{arm}-seed{seed}"
        train(data, out, args.steps, seed, args, towers, work / "train" / f"{arm}-seed0" if seed else None)
        results.append(evaluate(towers.attach(load_clip(checkpoint=str(out))), args.per_class, args.heldout_images))
        loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
        print(
            f"seed {seed} {arm:<30}"
            + " ".join(f"{k} {results[-1][k]:.3f}" for k in METRICS)
            + f" final_train_loss {loss:.3f}",
            flush=True,
        )
    return results


def run_arms(configs: dict, towers: FrozenTowerCache, timings: dict[str, float]) -> dict[str, tuple]:
    """Run each arm's config; arm -> ``(run directory, manifest)``."""
    runs = {}
    for arm, config in configs.items():
        key = {"raw": "raw run (download)", "curated": "curated run"}.get(arm, "ablation runs")
        with timed(timings, key):
            runs[arm] = run_curation(config, towers)
        print(
            f"{arm:<30} {runs[arm][1].export['rows']:>6,} rows exported; stages: "
            + ", ".join(stage_name(e) for e in config.stages),
            flush=True,
        )
    return runs


def setup(args: argparse.Namespace) -> Path:
    """The environment of the libraries and a clean work folder."""
    require_shared()
    for key, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_AUTH_MODE", "disabled"),
        ("HF_HUB_OFFLINE", "1"),
        ("WANDB_MODE", "disabled"),
        ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ):
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ray.data._internal.issue_detection").setLevel(logging.ERROR)  # memory hints per operator
    work = args.work or Path(tempfile.mkdtemp(prefix="curation-value-"))
    for stale in ("runs", "train", "score-shards", "oracle"):  # a rerun starts clean (the pool's port changes)
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def print_pool(args: argparse.Namespace, pool, kinds: Counter) -> None:
    """The pool's images and rows by kind, and the CLIP-score split."""
    facts = pool.facts
    print(
        f"{args.pool} pool: {sum(kinds.values()):,} rows over {facts['pool_flickr_images']} Flickr8k, "
        f"{facts['pool_tux_images']} Tux Paint and {facts['pool_cifar_images']} CIFAR-10 images "
        f"({len(pool.images):,} served files with the near-duplicates); "
        + ", ".join(f"{k} {v:,}" for k, v in kinds.most_common())
    )
    print(
        f"CLIP-score split: {facts['score_rows']:,} pairs; held-out Flickr8k images: evaluation only; "
        f"head concept '{HEAD_WORD}': {facts['head_images']} Flickr8k pool images x 4 extra captions"
    )


def print_curated(runs: dict, accounts: dict, counts: dict, kinds: Counter) -> None:
    """The exports' sizes, the curated run's stages and where each kind of row went."""
    curated = counts["curated"]
    print(
        f"\nraw export: {counts['raw']['rows']:,} rows; curated export: {curated['rows']:,} rows "
        f"({curated['rows'] / counts['raw']['rows']:.1%} of raw; an epoch draws {curated['per_epoch']:,} of them, "
        f"{curated['clean_per_epoch']:,} clean); oracle: {counts['oracle']['rows']:,} rows (the raw export's "
        "clean rows)"
    )
    print_stages(runs["curated"][1])
    print("\nwhere each kind of row went (curated run; rows rejected per stage):")
    order = ["clean"] + [k for k, _ in kinds.most_common() if k != "clean"]
    print_where(accounts["curated"][0], runs["curated"][1], order)
    print_score_auc(accounts["curated"][1])


def print_results(
    args: argparse.Namespace, results: dict, counts: dict, score_eval: dict, gaps: dict, score_rows: int
) -> None:
    """The raw / curated / oracle table and the ablation table."""
    print()
    print_summary(results, chance(results["raw"][0]["heldout_images"]), score_eval, gaps)
    print(
        f"(mean ± standard deviation over {args.seeds} seeds; raw {counts['raw']['rows']:,} rows, curated "
        f"{counts['curated']['rows']:,}, oracle {counts['oracle']['rows']:,}; gap closed: (curated - raw) / "
        f"(oracle - raw) of the means; score model: the CLIP-score model itself, {score_rows:,} clean "
        f"pairs disjoint from the pool)"
    )
    if args.ablation:
        print(
            "\nablation (each metric: mean over seeds, then its difference from the curated arm, the default "
            "recipe; rows: kept by the arm, of them clean and noise):"
        )
        print_ablation(results, counts, "curated")


def print_result_lines(results: dict, gaps: dict) -> None:
    """Curated vs raw zero-shot top-1, and the gap closed on the worst metric against the bar."""
    ours, baseline = means(results["curated"])["cifar10_top1"], means(results["raw"])["cifar10_top1"]
    print(
        f"result: curation_value ours={ours:.3f} baseline={baseline:.3f} ratio={ours / baseline:.2f} "
        f"cifar10_zeroshot_top1"
    )
    worst = min((g for g in gaps.values() if math.isfinite(g)), default=math.nan)
    print(
        f"result: curation_value_gap_closed ours={worst:.3f} baseline={GAP_BAR} ratio={worst / GAP_BAR:.2f} gap_closed"
    )


def main() -> None:
    args = parse_args()
    work = setup(args)
    started = time.monotonic()
    timings: dict[str, float] = {}

    pool = build_pool(args.captions_per_image, args.pool_seed, POOL_PER_CLASS if args.pool == "large" else 0)
    rows = subsample(pool.rows, args.limit_rows, args.pool_seed)
    kind_of = {pool_uid(i): row.kind for i, row in enumerate(rows)}
    kinds = Counter(kind_of.values())
    print_pool(args, pool, kinds)

    # The CLIP-score model: LiT heads trained by the project's trainer on the CLIP-score split.
    towers = FrozenTowerCache()
    score_model = work / "train" / "clip-score"
    with timed(timings, "CLIP-score model training"):
        write_shards(pool.score_rows, work / "score-shards")
        train(work / "score-shards", score_model, args.score_steps, 0, args, towers)

    from curation.metaclip.build import build_metadata, write_metadata

    metadata = work / "metadata.json"
    if not metadata.exists():
        write_metadata(build_metadata()[0], metadata)

    with served(pool.images) as base_url:
        write_pool(rows, base_url, work / "pool.csv")
        curated = curated_config(args, work, work / "pool.csv", metadata, score_model)
        configs = {"raw": arm_config(curated, "raw", set(), args.runner), "curated": curated}
        runs = run_arms(
            configs | (ablation_configs(curated, args.ablation_runner) if args.ablation else {}), towers, timings
        )

    accounts = {arm: account(run, manifest, kind_of) for arm, (run, manifest) in runs.items()}
    counts = {arm: kept(table) for arm, (table, _) in accounts.items()}
    write_oracle(*runs["raw"], kind_of, work / "oracle", curated.export.samples_per_shard)
    clean = counts["raw"]["clean"]
    counts["oracle"] = {"rows": clean, "clean": clean, "noise": 0}
    counts["oracle"] |= {"per_epoch": clean, "clean_per_epoch": clean, "noise_per_epoch": 0}
    data = {"raw": runs["raw"][0], "curated": runs["curated"][0], "oracle": work / "oracle"}
    data |= {arm: run for arm, (run, _) in runs.items() if arm not in data}
    print_curated(runs, accounts, counts, kinds)

    # Equal steps on every arm, several seeds; evaluation with the locked towers encoded once.
    print(
        f"\ntraining: {args.steps} steps of {args.batch_size} per arm and seed; epochs: "
        + ", ".join(f"{arm} {args.steps * args.batch_size / max(counts[arm]['per_epoch'], 1):.1f}" for arm in data)
    )
    from models.clip import load_clip

    with timed(timings, "training + evaluation"):
        results = {arm: train_arm(arm, path, args, towers, work) for arm, path in data.items()}
        score_eval = evaluate(
            towers.attach(load_clip(checkpoint=str(score_model))), args.per_class, args.heldout_images
        )
    print(f"locked image trunk: {towers.misses:,} images encoded, {towers.hits:,} reused (same pixels)")
    gaps = gap_closed(results["raw"], results["curated"], results["oracle"])
    print_results(args, results, counts, score_eval, gaps, pool.facts["score_rows"])
    timings["total"] = time.monotonic() - started
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print_result_lines(results, gaps)


if __name__ == "__main__":
    main()
