"""Dedup speed and recall: MinHash captions against datasketch, image cells against exact search.

``--part captions`` (the default ends with its result line): Flickr8k's 40,455 real captions
(``../shared/data/flickr8k/all_captions_text_only.csv``). Baseline: the straightforward
datasketch loop, per caption: normalise and shingle in Python, ``MinHash()`` and ``update`` per
shingle, ``MinHashLSH.insert``; then ``query`` per caption for the candidate pairs. Ours: the
``CaptionNearDuplicates`` stage's ``features`` (shingles, signatures, band keys), ``reduce``
(candidate pairs, exact Jaccard check) and ``cluster`` (clusters, survivors), same parameters,
in one process as the local runner runs them.
Candidate pairs must be identical. Then recall at the threshold: exact Jaccard by brute force
over a random sample of captions, against the stage's verified pairs within that sample.

``--part images``: synthetic 512-d unit vectors stored as float16 with planted near-duplicates
(noise at a chosen cosine), ``ImageNearDuplicates`` searching the pool whole (``index: exact``)
against searching it in k-means cells (``index: cells``): time and the share of the exact
search's pairs the cells find.

    .venv/bin/python benchmarks/dedup.py [--part captions|images|all] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.dedup import CaptionNearDuplicates, ImageNearDuplicates  # noqa: E402
from curation.dedup.linked import decide_in_process  # noqa: E402
from curation.dedup.minhash import candidate_pairs  # noqa: E402
from pipelines.stage import KEY  # noqa: E402
from schemas.embeddings import float16_lists  # noqa: E402

CAPTIONS = ROOT.parent / "shared" / "data" / "flickr8k" / "all_captions_text_only.csv"


def python_shingles(caption: str, size: int) -> set[str]:
    """The stage's normalisation and word shingles, written as a per-row Python loop would."""
    text = re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", caption.lower())).strip()
    words = text.split()
    if not words:
        return set()
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def datasketch_loop(captions: list[str], stage: CaptionNearDuplicates) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=stage.num_perm, params=(stage.bands, stage.rows_per_band))
    sketches = {}
    for i, caption in enumerate(captions):
        grams = python_shingles(caption, stage.shingle_size)
        if not grams:
            continue
        sketch = MinHash(num_perm=stage.num_perm, seed=stage.seed)
        for gram in grams:
            sketch.update(gram.encode())
        lsh.insert(i, sketch)
        sketches[i] = sketch
    pairs = set()
    for i, sketch in sketches.items():
        pairs.update((min(i, j), max(i, j)) for j in lsh.query(sketch) if j != i)
    return pairs


def run_stage(captions: list[str], stage: CaptionNearDuplicates):
    """The stage as the local runner runs it, over the whole pool in one table."""
    table = pa.table(
        {
            "uid": [str(i) for i in range(len(captions))],
            "source_index": pa.array(range(len(captions)), pa.int64()),
            "caption": captions,
        }
    )
    return decide_in_process(stage, table)


def pairs_of(left: np.ndarray, right: np.ndarray) -> set[tuple[int, int]]:
    return {(min(i, j), max(i, j)) for i, j in zip(left.tolist(), right.tolist()) if i != j}


def caption_part(args) -> str:
    if not CAPTIONS.exists():
        sys.exit(f"skipped: {CAPTIONS} is absent (the shared data is not beside the repository)")
    with CAPTIONS.open() as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    stage = CaptionNearDuplicates(threshold=args.threshold, shingle_size=args.shingle_size, max_bucket=10**9)
    print(
        f"{len(captions):,} Flickr8k captions; threshold {stage.threshold}, word {stage.shingle_size}-grams, "
        f"{stage.num_perm} permutations, {stage.bands} bands x {stage.rows_per_band} rows"
    )

    start = time.perf_counter()
    baseline_pairs = datasketch_loop(captions, stage)
    baseline = time.perf_counter() - start
    print(
        f"baseline (datasketch loop: MinHash + update per shingle, insert, query): {baseline:.2f} s, "
        f"{len(baseline_pairs):,} candidate pairs"
    )

    start = time.perf_counter()
    table, edges, decided, state = run_stage(captions, stage)
    ours = time.perf_counter() - start
    left, right, _ = candidate_pairs(table[KEY].to_numpy()[:, None], table["band"].to_numpy() >= 0, stage.max_bucket)
    index = table["source_index"].to_numpy()
    our_pairs = pairs_of(index[left], index[right])
    print(
        f"ours (stage features + reduce + cluster, with the exact Jaccard check and clusters): {ours:.2f} s, "
        f"{state['candidate_pairs']:,} candidate pairs over the bands, {state['verified_pairs']:,} at Jaccard >= "
        f"{stage.threshold}, {state['clusters']:,} clusters, {decided.num_rows:,} rows rejected, "
        f"largest {state['largest'][:5]}"
    )
    if our_pairs != baseline_pairs:
        sys.exit(
            f"candidate pairs differ: {len(our_pairs - baseline_pairs)} only ours, "
            f"{len(baseline_pairs - our_pairs)} only datasketch's"
        )
    print("candidate pairs: identical")

    verified = pairs_of(edges["left_source_index"].to_numpy(), edges["right_source_index"].to_numpy())
    sample = sorted(random.Random(0).sample(range(len(captions)), min(args.sample, len(captions))))
    sets = {i: python_shingles(captions[i], stage.shingle_size) for i in sample}
    truth = {
        (i, j)
        for i, j in itertools.combinations(sample, 2)
        if sets[i] and sets[j] and len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= stage.threshold
    }
    found = {p for p in verified if p[0] in sets and p[1] in sets}
    recall = len(truth & found) / len(truth) if truth else 1.0
    print(
        f"recall on {len(sample):,} sampled captions ({len(sample) * (len(sample) - 1) // 2:,} pairs by brute "
        f"force): {len(truth):,} pairs at Jaccard >= {stage.threshold}, {len(truth & found):,} found = {recall:.3f}; "
        f"false pairs kept: {len(found - truth)}"
    )
    rate_ours, rate_base = len(captions) / ours, len(captions) / baseline
    return (
        f"result: dedup_minhash_captions ours={rate_ours:.0f} baseline={rate_base:.0f} "
        f"ratio={rate_ours / rate_base:.2f} captions/s"
    )


def image_part(args) -> str:
    rng = np.random.default_rng(0)
    n, dim, planted = args.vectors, 512, args.vectors // 20
    base = rng.standard_normal((n, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    # Planted copies at cosine ~0.97 to their original, in place of random rows.
    originals = rng.choice(n // 2, planted, replace=False)
    copies = n // 2 + rng.choice(n - n // 2, planted, replace=False)
    noise = rng.standard_normal((planted, dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    base[copies] = 0.97 * base[originals] + np.sqrt(1 - 0.97**2) * noise
    table = pa.table(
        {
            "uid": [str(i) for i in range(n)],
            "source_index": pa.array(range(n), pa.int64()),
            "image_embedding": float16_lists(base),
        }
    )
    print(
        f"{n:,} synthetic {dim}-d float16 embeddings, {planted:,} planted near-duplicates at cosine ~0.97; "
        f"threshold {args.image_threshold}"
    )
    timings, pairs = {}, {}
    for kind in ("exact", "cells"):
        stage = ImageNearDuplicates(threshold=args.image_threshold, index=kind, rows_per_cell=args.rows_per_cell)
        start = time.perf_counter()
        _, edges, _, summary = decide_in_process(stage, table)
        timings[kind] = time.perf_counter() - start
        pairs[kind] = pairs_of(edges["left_source_index"].to_numpy(), edges["right_source_index"].to_numpy())
        print(f"{kind}: {timings[kind]:.1f} s, {len(pairs[kind]):,} pairs ({summary['cells']} cells)")
    planted_pairs = {(min(a, b), max(a, b)) for a, b in zip(originals.tolist(), copies.tolist())}
    recall = len(pairs["cells"] & pairs["exact"]) / max(1, len(pairs["exact"]))
    print(
        f"exact finds {len(planted_pairs & pairs['exact']):,} of the {planted:,} planted pairs; "
        f"k-means cells find {recall:.4f} of exact's pairs"
    )
    return (
        f"result: dedup_image_cells ours={n / timings['cells']:.0f} baseline={n / timings['exact']:.0f} "
        f"ratio={timings['exact'] / timings['cells']:.2f} vectors/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["captions", "images", "all"], default="captions")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--shingle-size", type=int, default=1)
    parser.add_argument("--sample", type=int, default=3000, help="captions compared by brute force for recall")
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--image-threshold", type=float, default=0.9)
    parser.add_argument("--rows-per-cell", type=int, default=2_000)
    args = parser.parse_args()
    lines = []
    if args.part in ("images", "all"):
        lines.append(image_part(args))
    if args.part in ("captions", "all"):
        lines.append(caption_part(args))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
