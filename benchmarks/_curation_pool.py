"""The noisy pool of ``curation_value.py``: real pairs, injected noise labelled by kind, served on 127.0.0.1.

The small pool is the real pairs of the pool split (Flickr8k and Tux Paint) with their noise; the
large one adds CIFAR-10 images (:mod:`benchmarks._curation_cifar`) with class-name captions in web
styles and noise of the same kinds in the same shares, drawn with a random generator of its own,
so the small pool's draws are the same either way. Both parts are shuffled together before the
duplicates are placed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from benchmarks._curation_cifar import names_class, pool_images, styled_caption
from benchmarks._real_pairs import SHARED, flickr_image, flickr_records, tux_records
from benchmarks.loopback import serve

#: Share of the non-held-out images (by a salted hash of the name) that train the CLIP-score model.
SCORE_SPLIT = 0.25
HEAD_WORD = "dog"
#: Injected rows of each kind per clean row (the head concept is 4 extra captions per dog photo).
MISMATCHED, SPAM_SHARE, JUNK = 0.30, 0.04, 0.10
DUPLICATES = (("exact_duplicate", 0.10), ("image_duplicate", 0.04), ("near_duplicate", 0.08))

SPAM = [
    "Click here to enlarge",
    "Free shipping on all orders over $50",
    "Copyright 2011 All rights reserved",
    "Share this on Facebook and Twitter",
    "Best price guaranteed, order today",
    "Sponsored content from our partners",
    "Download the free wallpaper in high resolution",
    "Subscribe to our newsletter for more deals",
    "View full size image in a new window",
    "Photo courtesy of the official tourism website",
    "Sale ends Sunday: up to 70% off",
    "Back to the product gallery",
    "Read more about this story",
    "Licensed under Creative Commons",
    "Stock photo royalty free",
    "Top 10 travel destinations this year",
]


@dataclass
class Row:
    image: int  # index into the served images
    caption: str
    kind: str
    source: str  # flickr | tux | cifar
    copy: int = 0  # > 0: the same bytes under another url (?copy=N)


@dataclass
class Pool:
    """The served images, the pool rows (in pool order), the CLIP-score split's pairs and counts."""

    images: list[bytes]
    rows: list[Row]
    score_rows: list[tuple[str, str, bytes]]
    facts: dict


@dataclass
class _Part:
    """Clean rows of some pool images, with each image's own captions (all of them for Flickr8k)."""

    clean: list[Row]
    own: dict[int, list[str]]
    every: dict[int, list[str]]


def pool_uid(index: int) -> str:
    """The uid of the pool's row ``index`` (its own, so MetaCLIP's draws do not depend on the port)."""
    return f"pool-{index:05d}"


def build_pool(captions_per_image: int, seed: int, cifar_per_class: int = 0) -> Pool:
    """The pool: the real pairs' part and, with ``cifar_per_class``, that many CIFAR-10 images a class."""
    rng = random.Random(seed)
    images: list[bytes] = []
    score_rows: list[tuple[str, str, bytes]] = []
    real = _real_part(images, score_rows, captions_per_image)
    other = _text_only_captions()
    other_head = [c for c in other if f" {HEAD_WORD}" in f" {c.lower()}"]
    noise = _text_noise(real, other, rng)
    heads = [i for i in real.every if sum(HEAD_WORD in c.lower() for c in real.every[i]) >= 3]
    head_rows = [Row(image, caption, "head", "flickr") for image in heads for caption in rng.sample(other_head, 4)]
    base_rows = real.clean + noise + head_rows
    facts = {
        "pool_flickr_images": len(real.every),
        "pool_tux_images": len(real.own) - len(real.every),
        "head_images": len(heads),
        "score_rows": len(score_rows),
        "pool_cifar_images": 0,
    }
    if cifar_per_class:
        cifar = _cifar_rows(
            images, cifar_per_class, other, other_head, len(head_rows) / len(real.clean), random.Random(f"cifar:{seed}")
        )
        facts["pool_cifar_images"] = sum(r.kind == "clean" for r in cifar)
        base_rows += cifar
    rng.shuffle(base_rows)
    return Pool(images, _with_duplicates(base_rows, images, rng), score_rows, facts)


def _in_score_split(name: str) -> bool:
    from models.evaluation.datasets import is_heldout

    return is_heldout(f"clip-score-split:{name}", SCORE_SPLIT)


def _real_part(images: list[bytes], score_rows: list, captions_per_image: int) -> _Part:
    """The pool split's Flickr8k and Tux Paint pairs (images appended to ``images``); the CLIP-score
    split's pairs go to ``score_rows``."""
    part = _Part([], {}, {})
    for record in flickr_records("train"):
        body = flickr_image(record["image"])
        captions = record["captions"][:captions_per_image]
        if _in_score_split(record["image"]):
            score_rows += [(f"flickr-{Path(record['image']).stem}-{k}", c, body) for k, c in enumerate(captions)]
            continue
        images.append(body)
        part.own[len(images) - 1], part.every[len(images) - 1] = captions, record["captions"]
        part.clean += [Row(len(images) - 1, c, "clean", "flickr") for c in captions]
    for i, record in enumerate(tux_records()):
        if _in_score_split(record["image"]):
            score_rows.append((f"tux-{i:04d}", record["caption"], record["jpeg"]))
            continue
        images.append(record["jpeg"])
        part.own[len(images) - 1] = [record["caption"]]
        part.clean.append(Row(len(images) - 1, record["caption"], "clean", "tux"))
    return part


def _text_only_captions() -> list[str]:
    """Captions of Flickr8k photos that have no image here (the text-only list): never eval text."""
    known = {r["image"] for r in flickr_records("all")}
    with open(SHARED / "flickr8k" / "all_captions_text_only.csv", newline="", encoding="utf-8") as f:
        return [row["caption"].strip() for row in csv.DictReader(f) if row["image"] not in known]


def _cifar_rows(
    images: list[bytes], per_class: int, other: list[str], other_head: list[str], head_share: float, rng: random.Random
) -> list[Row]:
    """CIFAR-10 pool images (appended to ``images``) with styled captions, and their noise: the
    text noise with mismatches across classes, and head rows (captions of Flickr8k dog photos on
    CIFAR dogs) in ``head_share`` of the clean rows."""
    part = _Part([], {}, {})
    concept: dict[int, str] = {}
    for name, body in pool_images(per_class):
        images.append(body)
        concept[len(images) - 1] = name
        part.own[len(images) - 1] = [styled_caption(name, rng)]
        part.clean.append(Row(len(images) - 1, part.own[len(images) - 1][0], "clean", "cifar"))
    dogs = [i for i, name in concept.items() if name == HEAD_WORD]
    heads = [
        Row(rng.choice(dogs), rng.choice(other_head), "head", "cifar")
        for _ in range(round(head_share * len(part.clean)))
    ]
    return part.clean + _text_noise(part, other, rng, concept) + heads


def _text_noise(part: _Part, other: list[str], rng: random.Random, concept: dict[int, str] | None = None) -> list[Row]:
    """Mismatched, boilerplate and junk rows on ``part``'s images, in their shares of its clean rows.

    A mismatched row pairs an image with another image's caption or with a text-only caption;
    with ``concept`` (an image's class), the other image is of another class and the text-only
    caption does not name the image's class.
    """
    n = len(part.clean)
    part_images = list(part.own)
    source_of = {r.image: r.source for r in part.clean}
    noise: list[Row] = []
    for _ in range(int(MISMATCHED * n)):
        image = rng.choice(part_images)
        if rng.random() < 0.5:
            donor = rng.choice(part_images)
            while donor == image or (concept and concept[donor] == concept[image]):
                donor = rng.choice(part_images)
            caption = rng.choice(part.own[donor])
        else:
            caption = rng.choice(other)
            while concept and names_class(caption, concept[image]):
                caption = rng.choice(other)
        noise.append(Row(image, caption, "mismatched", source_of[image]))
    for _ in range(int(SPAM_SHARE * n)):
        image = rng.choice(part_images)
        noise.append(Row(image, rng.choice(SPAM), "spam", source_of[image]))
    for _ in range(int(JUNK * n)):
        base = rng.choice(part.clean)
        noise.append(Row(base.image, _junk_caption(base.caption, rng), "junk", base.source))
    return noise


def _with_duplicates(base_rows: list[Row], images: list[bytes], rng: random.Random) -> list[Row]:
    """The rows with duplicates of clean rows, each at a random place after the row it copies (keep:
    first keeps the original); near-duplicate images are appended to ``images``."""
    keyed = [(float(i), row) for i, row in enumerate(base_rows)]
    clean_positions = [i for i, row in enumerate(base_rows) if row.kind == "clean"]
    copies = 0
    for kind, share in DUPLICATES:
        for _ in range(int(share * len(clean_positions))):
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
    return [row for _, row in keyed]


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
    edits = [
        lambda c: c,
        lambda c: c.lower().rstrip(" ."),
        lambda c: "Photo: " + c,
        lambda c: c.replace(" .", "") + " (photo)",
    ]
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


def subsample(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    """At most ``limit`` of the rows, drawn at random, in pool order (smoke runs)."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(f"limit:{seed}").sample(range(len(rows)), limit))]


def write_pool(rows: list[Row], base_url: str, path: Path) -> None:
    """The pool as the pipeline's input CSV (uid, url, caption)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uid", "url", "caption"])
        for i, row in enumerate(rows):
            url = f"{base_url}/{row.image}.jpg" + (f"?copy={row.copy}" if row.copy else "")
            writer.writerow([pool_uid(i), url, row.caption])


@contextlib.contextmanager
def served(images: list[bytes]) -> Iterator[str]:
    """Serve ``images`` on 127.0.0.1 from a separate process; yields the base url."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=serve, args=(images, queue), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{queue.get(timeout=60)}"
    finally:
        process.terminate()
        process.join(timeout=10)
