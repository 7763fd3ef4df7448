"""Near-duplicate image detection on real photos: precision and recall of ImageNearDuplicates.

Real images: the Flickr8k photos of ``../shared/data/flickr8k/images``. The first ``--sources``
get five near-duplicates each (JPEG quality 15, resized to half, 5% cropped from every side,
mirrored, a watermark line of text drawn across); the rest are distinct images mixed in. All
go through the project's ``ClipPreprocess`` and ``ClipEmbed`` with the ``lit-effnet-minilm``
CLIP (the packaged EfficientNet-Lite0 tower; its projection head is the seeded untrained one
unless ``--checkpoint`` names trained heads: a random linear map roughly preserves cosines),
then through ``ImageNearDuplicates`` at each threshold (``decide_in_process``: as the local
runner decides). Truth: two rows are duplicates when they come from the same photo. Reported
per threshold: pair precision and recall of the exact search, per transform the share of copies
clustered with their original, and the share of the exact search's linked pairs that the
search in k-means cells (``index: cells``, ``--rows-per-cell``) finds too; the result line is the
lowest of those shares.

    .venv/bin/python benchmarks/dedup_images_real.py [--sources 100] [--distinct 500]
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.clip_score import ClipEmbed, ClipPreprocess  # noqa: E402
from curation.dedup import ImageNearDuplicates  # noqa: E402
from curation.dedup.linked import decide_in_process  # noqa: E402
from schemas.columns import CAPTION, CLIP_PIXELS, IMAGE, IMAGE_EMBEDDING  # noqa: E402

IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _watermark(image: Image.Image) -> Image.Image:
    marked = image.copy()
    draw = ImageDraw.Draw(marked)
    w, h = marked.size
    draw.line([(0, int(h * 0.8)), (w, int(h * 0.8))], fill=(255, 255, 255), width=max(2, h // 60))
    draw.text((w // 10, int(h * 0.82)), "(c) stock photo agency www.example.invalid", fill=(255, 255, 255))
    return marked


TRANSFORMS = {
    "jpeg_q15": lambda im: _jpeg(im, 15),
    "resize_half": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2))),
    "crop_5pct": lambda im: _jpeg(
        im.crop((im.width // 20, im.height // 20, im.width - im.width // 20, im.height - im.height // 20))
    ),
    "mirror": lambda im: _jpeg(ImageOps.mirror(im)),
    "watermark": lambda im: _jpeg(_watermark(im)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=100, help="photos that get near-duplicates")
    parser.add_argument("--distinct", type=int, default=500, help="further photos without copies")
    parser.add_argument("--checkpoint", default=None, help="trained LiT heads (vlmcurate train clip output)")
    parser.add_argument("--thresholds", default="0.8,0.85,0.9,0.93,0.95,0.97")
    parser.add_argument("--rows-per-cell", type=int, default=64, help="k-means cell size for the cells search")
    args = parser.parse_args()
    if not IMAGES.exists():
        sys.exit(f"skipped: {IMAGES} is absent (the shared data is not beside the repository)")
    paths = sorted(IMAGES.glob("*.jpg"))[: args.sources + args.distinct]
    bodies, source, transform = [], [], []
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        bodies.append(path.read_bytes())
        source.append(i)
        transform.append("original")
        if i < args.sources:
            for name, make in TRANSFORMS.items():
                bodies.append(make(image))
                source.append(i)
                transform.append(name)
    source, transform = np.array(source), np.array(transform)
    print(
        f"{len(paths)} Flickr8k photos, {args.sources} with {len(TRANSFORMS)} near-duplicates each: {len(bodies)} rows"
    )

    start = time.perf_counter()
    preprocess = ClipPreprocess(model="lit-effnet-minilm", weights=args.checkpoint)
    embed = ClipEmbed(model="lit-effnet-minilm", weights=args.checkpoint, device="cpu")
    embed.setup()
    embeddings = []
    for offset in range(0, len(bodies), 64):
        chunk = pa.table({IMAGE: pa.array(bodies[offset : offset + 64], pa.binary())})
        pixels = preprocess(chunk)[CLIP_PIXELS]
        out = embed(pa.table({CLIP_PIXELS: pixels, CAPTION: ["a photo"] * len(chunk)}))
        embeddings.append(out[IMAGE_EMBEDDING])
    column = pa.chunked_array(embeddings)
    print(
        f"embedded in {time.perf_counter() - start:.1f} s "
        f"({'trained heads ' + args.checkpoint if args.checkpoint else 'untrained seeded heads'})"
    )

    batch = pa.table(
        {
            "uid": [str(i) for i in range(len(bodies))],
            "source_index": pa.array(range(len(bodies)), pa.int64()),
            IMAGE_EMBEDDING: column,
        }
    )
    truth = {(i, j) for i, j in itertools.combinations(range(len(bodies)), 2) if source[i] == source[j]}
    worst = 1.0
    copies = transform != "original"
    print("threshold | pairs found | precision | recall | " + " | ".join(TRANSFORMS) + " | cells' share of exact edges")
    for threshold in (float(t) for t in args.thresholds.split(",")):
        stage = ImageNearDuplicates(threshold=threshold, index="exact")
        _, edges, decided, _ = decide_in_process(stage, batch)
        cells = ImageNearDuplicates(threshold=threshold, index="cells", rows_per_cell=args.rows_per_cell)
        _, cell_edges, _, cell_summary = decide_in_process(cells, batch)
        exact_pairs, cell_pairs = _pairs(edges), _pairs(cell_edges)
        cell_recall = len(exact_pairs & cell_pairs) / len(exact_pairs) if exact_pairs else 1.0
        cluster_of = {}
        # Rows rejected point at their survivor; survivors are their own cluster root.
        for index, survivor in zip(decided["source_index"].to_pylist(), decided["survivor_uid"].to_pylist()):
            cluster_of[index] = int(survivor)
        labels = np.array([cluster_of.get(i, i) for i in range(len(bodies))])
        found = {(i, j) for i, j in itertools.combinations(range(len(bodies)), 2) if labels[i] == labels[j]}
        precision = len(found & truth) / len(found) if found else 1.0
        recall = len(found & truth) / len(truth)
        original_label = {s: labels[i] for i, s in enumerate(source) if transform[i] == "original"}
        per = [
            np.mean([labels[i] == original_label[source[i]] for i in np.flatnonzero(copies & (transform == name))])
            for name in TRANSFORMS
        ]
        shares = " | ".join(f"{p:.2f}" for p in per)
        print(
            f"{threshold:.2f} | {len(found):,} | {precision:.3f} | {recall:.3f} | {shares} | "
            f"{cell_recall:.3f} of {len(exact_pairs):,} ({cell_summary['cells']} cells)"
        )
        worst = min(worst, cell_recall)
    print(f"result: dedup_image_cells_recall ours={worst:.4f} baseline=1.0000 ratio={worst:.4f} share of exact pairs")


def _pairs(edges: pa.Table) -> set[tuple[int, int]]:
    left, right = edges["left_source_index"].to_pylist(), edges["right_source_index"].to_pylist()
    return {(min(a, b), max(a, b)) for a, b in zip(left, right)}


if __name__ == "__main__":
    main()
