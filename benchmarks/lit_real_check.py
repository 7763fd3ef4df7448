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
import io
import json
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

from models.clip import load_clip  # noqa: E402
from models.evaluation import CaptionedImageSet, LabelledImageSet, evaluate_retrieval, evaluate_zeroshot  # noqa: E402
from models.evaluation.datasets import is_heldout  # noqa: E402
from models.training.clip_recipe import ClipTrainConfig, train_clip  # noqa: E402
from pipelines.export import write_webdataset  # noqa: E402

HELDOUT_FRACTION = 0.25


def _on_white(body: bytes) -> bytes:
    with Image.open(io.BytesIO(body)) as image:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        out = io.BytesIO()
        canvas.convert("RGB").save(out, format="JPEG", quality=92)
        return out.getvalue()


def training_rows() -> list[tuple[str, str, bytes]]:
    rows = []
    folder = SHARED / "flickr8k"
    for line in (folder / "captions.jsonl").read_text().splitlines():
        record = json.loads(line)
        if is_heldout(record["image"], HELDOUT_FRACTION):
            continue
        body = (folder / "images" / record["image"]).read_bytes()
        for k, caption in enumerate(record["captions"][:2]):
            rows.append((f"flickr-{Path(record['image']).stem}-{k}", caption, body))
    with tarfile.open(SHARED / "tuxpaint" / "stamps.tar") as tar:
        manifest = [json.loads(x) for x in tar.extractfile("manifest.jsonl").read().decode().splitlines()]
        for i, record in enumerate(manifest):
            rows.append((f"tux-{i:04d}", record["caption"], _on_white(tar.extractfile(record["image"]).read())))
    return rows


def write_shards(rows: list[tuple[str, str, bytes]], folder: Path, per_shard: int = 500) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(rows), per_shard)):
        part = rows[start:start + per_shard]
        with open(folder / f"{index:05d}.tar", "wb") as out:
            write_webdataset(pa.table({"uid": [r[0] for r in part], "caption": [r[1] for r in part],
                                       "image": [r[2] for r in part]}), out)


def evaluate(bundle, per_class: int, heldout_images: int) -> dict:
    zeroshot = evaluate_zeroshot(bundle, LabelledImageSet(SHARED / "cifar10" / "test.tar", per_class=per_class))
    retrieval = evaluate_retrieval(bundle, CaptionedImageSet(SHARED / "flickr8k" / "captions.jsonl", split="heldout",
                                                             heldout_fraction=HELDOUT_FRACTION, limit=heldout_images),
                                   ks=(1, 5, 10))
    return {"cifar10_top1": zeroshot["top1"], "cifar10_top5": zeroshot["top5"],
            "i2t_R@5": retrieval["image_to_text"]["R@5"], "t2i_R@5": retrieval["text_to_image"]["R@5"],
            "pair_auc": retrieval["pair_auc"]["auc"], "heldout_images": retrieval["n_images"]}


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
    train_clip(ClipTrainConfig(model="lit-effnet-minilm", train_data=[str(work / "shards")],
                               output_dir=str(work / "train"), batch_size=args.batch_size, max_steps=args.steps,
                               lr=args.lr, warmup_steps=20, save_every=args.steps))
    train_seconds = time.monotonic() - started
    trained = evaluate(load_clip(checkpoint=str(work / "train")), args.per_class, args.heldout_images)

    chance = {"cifar10_top1": 0.1, "cifar10_top5": 0.5, "i2t_R@5": 5 * 5 / (5 * untrained["heldout_images"]),
              "t2i_R@5": 5 / untrained["heldout_images"], "pair_auc": 0.5}
    print(f"training: {args.steps} steps of {args.batch_size} in {train_seconds:.0f} s (feature caching included)")
    print(f"{'metric':<14}{'chance':>10}{'untrained':>12}{'trained':>10}")
    for key in chance:
        print(f"{key:<14}{chance[key]:>10.3f}{untrained[key]:>12.3f}{trained[key]:>10.3f}")
    ratio = trained["cifar10_top1"] / max(untrained["cifar10_top1"], 1e-9)
    print(f"result: lit_real_check ours={trained['cifar10_top1']:.3f} baseline={untrained['cifar10_top1']:.3f} "
          f"ratio={ratio:.2f} cifar10_zeroshot_top1")


if __name__ == "__main__":
    main()
