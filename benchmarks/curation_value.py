"""Curation value (issue 11): does the LiT CLIP trained on the curated pool beat the one trained on
the raw pool, at equal steps?

Real pairs from ``../shared/data`` are split three ways by a hash of the image name: held-out
Flickr8k images (evaluation only), a CLIP-score split (Flickr8k and Tux Paint, used only to train
the heads of the score model) and the pool split. The pool is the pool split's real pairs (each
Flickr8k image with ``--captions-per-image`` captions, each Tux Paint stamp with its caption) plus
injected noise, each row labelled by its kind:

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

The images are served on 127.0.0.1 by a separate process, and the pool goes through the project's
own runner (``pipelines.plan.build_plan`` + ``pipelines.execute.run_pipeline``, what
``vlmcurate run`` calls) twice: (a) **raw**: ``configs/curation-value.yaml`` with only its Download
stage; (b) **curated**: the whole config (text rules, exact duplicates, MetaCLIP match + balance,
download, image rules, exact image duplicates, CLIP score top fraction, near-duplicate pairs).
The CLIP-score model is the LiT CLIP with heads trained by the project's trainer on the
CLIP-score split. Both exports then train the LiT CLIP heads with the same recipe for the same
``--steps`` (equal samples seen: the smaller curated set is seen for more epochs), for each of
``--seeds`` seeds (head initialisation and batch order; the pool and the curation are fixed), and
are evaluated zero-shot on CIFAR-10 test and by retrieval on the held-out Flickr8k images.

    .venv/bin/python benchmarks/curation_value.py [--steps 300] [--seeds 3] [--work DIR]
        [--runner ray|local] [--clip-fraction F] [--metaclip-threshold T]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

# OpenMP's spinning barrier makes a step of the heads about 25x slower when other processes compete for
# this VM's 2 cores (measured: 195 ms vs 8 ms for a 1280x256 linear step); passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._real_pairs import (  # noqa: E402
    METRICS,
    SHARED,
    FrozenTowerCache,
    chance,
    evaluate,
    flickr_image,
    flickr_records,
    require_shared,
    tux_records,
    write_shards,
)
from benchmarks.loopback import serve  # noqa: E402

CONFIG = REPO / "configs" / "curation-value.yaml"
#: Share of the non-held-out images (by a salted hash of the name) that train the CLIP-score model.
SCORE_SPLIT = 0.25
HEAD_WORD = "dog"

SPAM = ["Click here to enlarge", "Free shipping on all orders over $50", "Copyright 2011 All rights reserved",
        "Share this on Facebook and Twitter", "Best price guaranteed, order today",
        "Sponsored content from our partners",
        "Download the free wallpaper in high resolution", "Subscribe to our newsletter for more deals",
        "View full size image in a new window", "Photo courtesy of the official tourism website",
        "Sale ends Sunday: up to 70% off", "Back to the product gallery", "Read more about this story",
        "Licensed under Creative Commons", "Stock photo royalty free", "Top 10 travel destinations this year"]


@dataclass
class Row:
    image: int           # index into the served images
    caption: str
    kind: str
    source: str          # flickr | tux
    copy: int = 0        # > 0: the same bytes under another url (?copy=N)


def _in_score_split(name: str) -> bool:
    from models.evaluation.datasets import is_heldout

    return is_heldout(f"clip-score-split:{name}", SCORE_SPLIT)


def _near_copy(body: bytes, rng: random.Random) -> bytes:
    """A near-duplicate of an image: JPEG quality 30, half size, 5% crop a side, or mirrored."""
    with Image.open(io.BytesIO(body)) as image:
        image = image.convert("RGB")
        kind = rng.randrange(4)
        w, h = image.size
        quality = 90
        if kind == 0:
            quality = 30
        elif kind == 1:
            image = image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
        elif kind == 2:
            image = image.crop((w // 20, h // 20, w - w // 20, h - h // 20))
        else:
            image = ImageOps.mirror(image)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return out.getvalue()


def _light_edit(caption: str, rng: random.Random) -> str:
    edits = [lambda c: c, lambda c: c.lower().rstrip(" ."), lambda c: "Photo: " + c,
             lambda c: c.replace(" .", "") + " (photo)"]
    return rng.choice(edits)(caption)


def _junk_caption(caption: str, rng: random.Random) -> str:
    from pipelines.demo.pool import JUNK  # the demo's junk alt-text templates

    draw = rng.random()
    if draw < 0.6:
        return rng.choice(JUNK).format(n=rng.randint(100, 9999), m=rng.randint(100, 2000))
    if draw < 0.8:
        return rng.choice(caption.split()[1:] or ["photo"])  # one word
    if draw < 0.9:
        return " ".join([caption] * 40)  # overlong
    return caption + "\x07"


def build_pool(captions_per_image: int, seed: int) -> tuple[list[bytes], list[Row], list[tuple[str, str, bytes]], dict]:
    """The served images, the pool rows (in pool order) and the CLIP-score split's training rows."""
    rng = random.Random(seed)
    images: list[bytes] = []
    clean: list[Row] = []
    score_rows: list[tuple[str, str, bytes]] = []
    own_captions: dict[int, list[str]] = {}
    all_captions: dict[int, list[str]] = {}
    flickr_pool: list[int] = []
    known = {r["image"] for r in flickr_records("all")}
    for record in flickr_records("train"):
        body = flickr_image(record["image"])
        captions = record["captions"][:captions_per_image]
        if _in_score_split(record["image"]):
            score_rows += [(f"flickr-{Path(record['image']).stem}-{k}", c, body) for k, c in enumerate(captions)]
            continue
        index = len(images)
        images.append(body)
        own_captions[index], all_captions[index] = captions, record["captions"]
        flickr_pool.append(index)
        clean += [Row(index, c, "clean", "flickr") for c in captions]
    for i, record in enumerate(tux_records()):
        if _in_score_split(record["image"]):
            score_rows.append((f"tux-{i:04d}", record["caption"], record["jpeg"]))
            continue
        index = len(images)
        images.append(record["jpeg"])
        own_captions[index] = [record["caption"]]
        clean.append(Row(index, record["caption"], "clean", "tux"))
    source_of = {r.image: r.source for r in clean}

    # Captions of Flickr8k photos that have no image here (the text-only list): never eval text.
    other: list[str] = []
    with open(SHARED / "flickr8k" / "all_captions_text_only.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["image"] not in known:
                other.append(row["caption"].strip())
    other_head = [c for c in other if f" {HEAD_WORD}" in f" {c.lower()}"]

    n = len(clean)
    noise: list[Row] = []
    pool_images = list(own_captions)
    for _ in range(int(0.30 * n)):
        image = rng.choice(pool_images)
        if rng.random() < 0.5:
            donor = rng.choice(pool_images)
            while donor == image:
                donor = rng.choice(pool_images)
            caption = rng.choice(own_captions[donor])
        else:
            caption = rng.choice(other)
        noise.append(Row(image, caption, "mismatched", source_of[image]))
    for _ in range(int(0.04 * n)):
        image = rng.choice(pool_images)
        noise.append(Row(image, rng.choice(SPAM), "spam", source_of[image]))
    for _ in range(int(0.10 * n)):
        base = rng.choice(clean)
        noise.append(Row(base.image, _junk_caption(base.caption, rng), "junk", base.source))
    heads = [i for i in flickr_pool if sum(HEAD_WORD in c.lower() for c in all_captions[i]) >= 3]
    for image in heads:
        for caption in rng.sample(other_head, 4):
            noise.append(Row(image, caption, "head", "flickr"))
    base_rows = clean + noise
    rng.shuffle(base_rows)

    # Duplicates go after the row they copy, at a random later place (keep: first keeps the original).
    keyed = [(float(i), row) for i, row in enumerate(base_rows)]
    clean_positions = [i for i, row in enumerate(base_rows) if row.kind == "clean"]
    copies = 0
    for kind, share in (("exact_duplicate", 0.10), ("image_duplicate", 0.04), ("near_duplicate", 0.08)):
        for _ in range(int(share * n)):
            position = rng.choice(clean_positions)
            original = base_rows[position]
            if kind == "exact_duplicate":
                row = Row(original.image, original.caption, kind, original.source)
            elif kind == "image_duplicate":
                copies += 1
                row = Row(original.image, original.caption, kind, original.source, copy=copies)
            else:
                images.append(_near_copy(images[original.image], rng))
                row = Row(len(images) - 1, _light_edit(original.caption, rng), kind, original.source)
            keyed.append((rng.uniform(position + 0.5, len(base_rows)), row))
    keyed.sort(key=lambda item: item[0])
    rows = [row for _, row in keyed]
    facts = {"pool_flickr_images": len(flickr_pool), "pool_tux_images": len(pool_images) - len(flickr_pool),
             "head_images": len(heads), "score_rows": len(score_rows)}
    return images, rows, score_rows, facts


def write_pool(rows: list[Row], base_url: str, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uid", "url", "caption"])
        for i, row in enumerate(rows):
            url = f"{base_url}/{row.image}.jpg" + (f"?copy={row.copy}" if row.copy else "")
            writer.writerow([f"pool-{i:05d}", url, row.caption])  # own uids: the draws do not depend on the port


def start_server(images: list[bytes]) -> tuple[multiprocessing.Process, str]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=serve, args=(images, queue), daemon=True)
    process.start()
    return process, f"http://127.0.0.1:{queue.get(timeout=60)}"


def pipeline_configs(args: argparse.Namespace, work: Path, pool: Path, metadata: Path, score_model: Path):
    """The curated config (the YAML with the benchmark's paths) and the raw one (its Download only)."""
    from pipelines.config import load_config

    overrides = [f"input={pool}", f"output_dir={work / 'runs'}", f"runner={args.runner}",
                 f"stages.metaclip_match.metadata={metadata}", f"stages.clip_preprocess.weights={score_model}",
                 f"stages.clip_embed.weights={score_model}",
                 f"stages.clip_score_top_fraction.fraction={args.clip_fraction}"]
    if args.metaclip_threshold is not None:
        overrides += [f"stages.metaclip_balance.threshold={args.metaclip_threshold}",
                      "stages.metaclip_balance.tail_share=null"]
    curated = load_config(args.config, overrides)
    download = [s for s in curated.stages if s.stage == "pipelines.download:Download"]
    raw = curated.model_copy(update={"name": curated.name + "-raw", "stages": download})
    return raw, curated


def run_curation(config):
    from pipelines.execute import run_pipeline
    from pipelines.plan import build_plan
    from pipelines.runner import make_runner

    plan = build_plan(config)
    runner = make_runner(config.runner, config.ray)
    try:
        manifest = run_pipeline(plan, runner)
    finally:
        runner.close()
    return plan.run_uri, manifest


def _parquets(folder: Path, columns: list[str]):
    import pyarrow as pa

    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None


def account(run: Path, manifest, labels: list[Row]) -> tuple[dict, dict]:
    """Per noise kind: rows in the pool, rows kept, rows rejected by stage; CLIP-score AUC of clean vs mismatched."""
    inputs = _parquets(run / "00_input", ["uid", "source_index"])
    kind_of = {u: labels[i].kind for u, i in zip(inputs["uid"].to_pylist(), inputs["source_index"].to_pylist())}
    kept = set(_parquets(run / manifest.final_phase, ["uid"])["uid"].to_pylist())
    table: dict[str, Counter] = defaultdict(Counter)
    for row in labels:
        table[row.kind]["pool"] += 1
    for uid in kept:
        table[kind_of[uid]]["kept"] += 1
    for phase in sorted((run / "rejects").iterdir()):
        rejects = _parquets(phase, ["uid", "stage"])
        if rejects is None:
            continue
        for uid, stage in zip(rejects["uid"].to_pylist(), rejects["stage"].to_pylist()):
            table[kind_of.get(uid, "unread")][stage] += 1
    scores: dict[str, list[float]] = defaultdict(list)
    scored_phase = next((p.name for p in manifest.phases if "clip_embed" in p.counts), None)
    if scored_phase:
        scored = _parquets(run / scored_phase, ["uid", "clip_score"])
        for uid, score in zip(scored["uid"].to_pylist(), scored["clip_score"].to_pylist()):
            scores[kind_of[uid]].append(score)
    return table, scores


def auc(positive: list[float], negative: list[float]) -> float:
    from models.evaluation import roc_auc

    return roc_auc(np.asarray(positive), np.asarray(negative)) if positive and negative else float("nan")


def train(data: Path, out: Path, steps: int, seed: int, args: argparse.Namespace, towers: FrozenTowerCache,
          cache_from: Path | None = None) -> None:
    """Train the LiT heads with the project's recipe (``vlmcurate train clip``'s code).

    The recipe caches the locked towers' outputs once per training set (its own feature cache);
    here its model's image trunk is also memoised per image (:class:`FrozenTowerCache`), so an
    image that an earlier training or evaluation in this process already encoded (the curated
    rows are a subset of the raw ones) is not encoded again. A later seed on the same data
    starts from the first seed's feature cache file, which the recipe accepts as its own.
    """
    import models.training.clip_recipe as recipe

    out.mkdir(parents=True, exist_ok=True)
    if cache_from is not None and (cache_from / "feature_cache-rank0.pt").exists():
        shutil.copy(cache_from / "feature_cache-rank0.pt", out / "feature_cache-rank0.pt")
    original = recipe.load_clip
    recipe.load_clip = lambda *a, **k: towers.attach(original(*a, **k), text=False)
    try:
        recipe.train_clip(recipe.ClipTrainConfig(
            model="lit-effnet-minilm", train_data=[str(data)], output_dir=str(out), batch_size=args.batch_size,
            max_steps=steps, lr=args.lr, warmup_steps=20, save_every=steps, seed=seed))
    finally:
        recipe.load_clip = original


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each arm (equal steps)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--score-steps", type=int, default=300, help="training steps of the CLIP-score model")
    parser.add_argument("--clip-fraction", type=float, default=0.7, help="ClipScoreTopFraction's fraction")
    parser.add_argument("--metaclip-threshold", type=int, default=None,
                        help="a fixed t instead of the config's tail share")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--pool-seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--heldout-images", type=int, default=200)
    parser.add_argument("--runner", choices=["ray", "local"], default="ray")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    require_shared()
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"),
                       ("WANDB_MODE", "disabled"), ("NO_ALBUMENTATIONS_UPDATE", "1")):
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ray.data._internal.issue_detection").setLevel(logging.ERROR)  # memory hints per operator
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="curation-value-"))
    for stale in ("runs", "train", "score-shards"):  # a rerun starts clean (the pool's port changes)
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    images, rows, score_rows, facts = build_pool(args.captions_per_image, args.pool_seed)
    kinds = Counter(r.kind for r in rows)
    print(f"pool: {len(rows):,} rows over {facts['pool_flickr_images']} Flickr8k and {facts['pool_tux_images']} "
          f"Tux Paint images ({len(images):,} served files with the near-duplicates); "
          + ", ".join(f"{k} {v:,}" for k, v in kinds.most_common()))
    print(f"CLIP-score split: {facts['score_rows']:,} pairs; held-out Flickr8k images: evaluation only; "
          f"head concept '{HEAD_WORD}': {facts['head_images']} pool images x 4 extra captions")

    # The CLIP-score model: LiT heads trained by the project's trainer on the CLIP-score split.
    t = time.monotonic()
    write_shards(score_rows, work / "score-shards")
    score_model = work / "train" / "clip-score"
    towers = FrozenTowerCache()
    train(work / "score-shards", score_model, args.score_steps, 0, args, towers)
    timings["CLIP-score model training"] = time.monotonic() - t

    from curation.metaclip.build import build_metadata, write_metadata

    metadata = work / "metadata.json"
    if not metadata.exists():
        write_metadata(build_metadata()[0], metadata)

    server, base_url = start_server(images)
    try:
        pool = work / "pool.csv"
        write_pool(rows, base_url, pool)
        raw_config, curated_config = pipeline_configs(args, work, pool, metadata, score_model)
        t = time.monotonic()
        raw_run, raw_manifest = run_curation(raw_config)
        timings["raw run (download)"] = time.monotonic() - t
        t = time.monotonic()
        curated_run, curated_manifest = run_curation(curated_config)
        timings["curated run"] = time.monotonic() - t
    finally:
        server.terminate()
        server.join(timeout=10)

    raw_rows, curated_rows = raw_manifest.export["rows"], curated_manifest.export["rows"]
    print(f"\nraw export: {raw_rows:,} rows; curated export: {curated_rows:,} rows "
          f"({curated_rows / raw_rows:.1%} of raw)")
    print(f"{'stage':<24}{'in':>7}{'kept':>7}  rejected")
    for phase in curated_manifest.phases:
        for name, c in phase.counts.items():
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(c.rejected.items(), key=lambda x: -x[1]))
            print(f"{name:<24}{c.rows_in:>7,}{c.rows_kept:>7,}  {reasons}")
    balance = curated_manifest.aggregates.get("metaclip_balance", {})
    top = curated_manifest.aggregates.get("clip_score_top_fraction", {})
    print(f"MetaCLIP t = {balance.get('threshold')} ({balance.get('head_entries')} head entries of "
          f"{balance.get('entries_matched')} matched; tail share {balance.get('tail_share', 0):.3f}); "
          f"CLIP-score cutoff {top.get('cutoff_score', float('nan')):.4f} (top {top.get('fraction')})")
    table, scores = account(Path(curated_run), curated_manifest, rows)
    stages = [name for phase in curated_manifest.phases for name in phase.counts
              if any(c[name] for c in table.values())]  # the stages that rejected something
    short = {s: s.replace("caption_", "").replace("_duplicates", "_dup").replace("clip_score_", "clip_")[:12]
             for s in stages}
    print("\nwhere each kind of row went (curated run; rows rejected per stage):")
    print(f"{'kind':<16}{'pool':>6}{'kept':>6}" + "".join(f"{short[s]:>13}" for s in stages))
    for kind in ["clean"] + [k for k, _ in kinds.most_common() if k != "clean"]:
        c = table[kind]
        print(f"{kind:<16}{c['pool']:>6}{c['kept']:>6}" + "".join(f"{c[s]:>13}" for s in stages))
    clean_scores = scores.get("clean", [])
    print("CLIP score (score model) of clean rows vs: "
          + ", ".join(f"{k} AUC {auc(clean_scores, v):.3f}" for k, v in scores.items() if k != "clean"))

    # Equal steps on both exports, several seeds; evaluation with the locked towers encoded once.
    epochs = {arm: args.steps * args.batch_size / n for arm, n in (("raw", raw_rows), ("curated", curated_rows))}
    print(f"\ntraining: {args.steps} steps of {args.batch_size} per arm and seed: "
          f"{epochs['raw']:.1f} epochs of raw, {epochs['curated']:.1f} epochs of curated")
    from models.clip import load_clip

    results: dict[str, list[dict]] = {"raw": [], "curated": []}
    t = time.monotonic()
    for seed in range(args.seeds):
        for arm, run in (("raw", raw_run), ("curated", curated_run)):
            out = work / "train" / f"{arm}-seed{seed}"
            first = work / "train" / f"{arm}-seed0"
            train(Path(run), out, args.steps, seed, args, towers, first if seed else None)
            results[arm].append(evaluate(towers.attach(load_clip(checkpoint=str(out))), args.per_class,
                                         args.heldout_images))
            loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
            print(f"seed {seed} {arm:<8}" + " ".join(f"{k} {results[arm][-1][k]:.3f}" for k in METRICS)
                  + f" final_train_loss {loss:.3f}", flush=True)
    score_eval = evaluate(towers.attach(load_clip(checkpoint=str(score_model))), args.per_class, args.heldout_images)
    timings["training + evaluation"] = time.monotonic() - t
    print(f"locked image trunk: {towers.misses:,} images encoded, {towers.hits:,} reused (same pixels)")

    base = chance(results["raw"][0]["heldout_images"])
    print(f"\n{'metric':<14}{'chance':>8}{'raw pool':>18}{'curated':>18}{'ratio':>8}{'score model':>13}")
    for key in METRICS:
        raw_m, raw_s = mean_sd([r[key] for r in results["raw"]])
        cur_m, cur_s = mean_sd([r[key] for r in results["curated"]])
        print(f"{key:<14}{base[key]:>8.3f}{raw_m:>10.3f} ± {raw_s:.3f}{cur_m:>10.3f} ± {cur_s:.3f}"
              f"{cur_m / raw_m if raw_m else float('nan'):>8.2f}{score_eval[key]:>13.3f}")
    print(f"(mean ± standard deviation over {args.seeds} seeds; raw {raw_rows:,} rows, curated {curated_rows:,}; "
          f"score model: the CLIP-score model itself, {facts['score_rows']:,} clean pairs disjoint from the pool)")
    timings["total"] = time.monotonic() - started
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    ours, baseline = mean_sd([r["cifar10_top1"] for r in results["curated"]])[0], \
        mean_sd([r["cifar10_top1"] for r in results["raw"]])[0]
    print(f"result: curation_value ours={ours:.3f} baseline={baseline:.3f} ratio={ours / baseline:.2f} "
          f"cifar10_zeroshot_top1")


if __name__ == "__main__":
    main()
