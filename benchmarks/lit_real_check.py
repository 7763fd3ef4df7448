"""Real-data check of the LiT CLIP (issue 6): train its heads with `vlmcurate train clip`'s recipe on
real pairs, then compare with the same model with untrained heads and with chance.

Training pairs: Flickr8k images outside the held-out split (2 captions each) and the Tux Paint
stamps (cut-outs composited on white), written as webdataset shards exactly as the export writes
them. Evaluation: zero-shot on the CIFAR-10 test tar (``--per-class`` images per class), and on
held-out Flickr8k images: image<->text recall@k and the ROC AUC of the CLIP score for true vs
shuffled pairs.

    .venv/bin/python benchmarks/lit_real_check.py [--steps 300] [--per-class 100] [--work DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._real_pairs import (  # noqa: E402
    SHARED,
    evaluate,
    flickr_image,
    flickr_records,
    tux_records,
    write_shards,
)
from models.clip import load_clip  # noqa: E402
from models.training.clip_recipe import ClipTrainConfig, train_clip  # noqa: E402


def training_rows() -> list[tuple[str, str, bytes]]:
    rows = []
    for record in flickr_records("train"):
        body = flickr_image(record["image"])
        for k, caption in enumerate(record["captions"][:2]):
            rows.append((f"flickr-{Path(record['image']).stem}-{k}", caption, body))
    for i, record in enumerate(tux_records()):
        rows.append((f"tux-{i:04d}", record["caption"], record["jpeg"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--heldout-images", type=int, default=200)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if not SHARED.exists():
        sys.exit(f"skipped: shared data not found at {SHARED}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="lit-check-"))
    rows = training_rows()
    write_shards(rows, work / "shards")
    print(f"{len(rows)} training pairs in {work / 'shards'}")

    untrained = evaluate(load_clip("lit-effnet-minilm"), args.per_class, args.heldout_images)
    started = time.monotonic()
    train_clip(
        ClipTrainConfig(
            model="lit-effnet-minilm",
            train_data=[str(work / "shards")],
            output_dir=str(work / "train"),
            batch_size=args.batch_size,
            max_steps=args.steps,
            lr=args.lr,
            warmup_steps=20,
            save_every=args.steps,
        )
    )
    train_seconds = time.monotonic() - started
    trained = evaluate(load_clip(checkpoint=str(work / "train")), args.per_class, args.heldout_images)

    chance = {
        "cifar10_top1": 0.1,
        "cifar10_top5": 0.5,
        "i2t_R@5": 5 * 5 / (5 * untrained["heldout_images"]),
        "t2i_R@5": 5 / untrained["heldout_images"],
        "pair_auc": 0.5,
    }
    print(f"training: {args.steps} steps of {args.batch_size} in {train_seconds:.0f} s (feature caching included)")
    print(f"{'metric':<14}{'chance':>10}{'untrained':>12}{'trained':>10}")
    for key in chance:
        print(f"{key:<14}{chance[key]:>10.3f}{untrained[key]:>12.3f}{trained[key]:>10.3f}")
    ratio = trained["cifar10_top1"] / max(untrained["cifar10_top1"], 1e-9)
    print(
        f"result: lit_real_check ours={trained['cifar10_top1']:.3f} baseline={untrained['cifar10_top1']:.3f} "
        f"ratio={ratio:.2f} cifar10_zeroshot_top1"
    )


if __name__ == "__main__":
    main()
