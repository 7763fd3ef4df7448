"""A synthetic url pool with the noise of real web alt-text, for ``vlmcurate demo``.

Deterministic for a seed, built from word lists in this file (no network, nothing from outside
the project): plain descriptive captions and product titles, plus the junk a crawl brings:
file names, bare dimensions, URLs, stock words, empty and overlong captions, control
characters, exact duplicate pairs, and a few malformed CSV lines. The URLs point at the
reserved ``.invalid`` domain: the demo's download step will serve its own images.
"""

from __future__ import annotations

import csv
import random

ADJECTIVES = ["red", "small", "old", "wooden", "bright", "quiet", "busy", "snowy", "golden", "striped",
              "green", "tall", "rusty", "modern", "sunlit", "empty", "crowded", "tiny", "white", "dark"]
SUBJECTS = ["dog", "cat", "bicycle", "lighthouse", "kitchen", "bridge", "market", "sailboat", "horse",
            "teapot", "mountain", "guitar", "train", "garden", "castle", "child", "owl", "tractor",
            "umbrella", "bookshelf", "river", "street", "pizza", "tent", "piano"]
VERBS = ["standing", "resting", "parked", "sitting", "waiting", "glowing", "drying", "leaning"]
PLACES = ["near the beach", "in a field", "on a city street", "under a tree", "by the window",
          "at sunset", "in the snow", "on a wooden table", "beside a lake", "in a small village"]
PRODUCTS = ["T-Shirt", "Coffee Mug", "Phone Case", "Wall Clock", "Desk Lamp", "Backpack", "Sneakers"]
JUNK = ["IMG_{n}.JPG", "DSC0{n}.jpg", "{n}x{m}", "{n} x {m} px", "https://demo.invalid/p/{n}",
        "image", "thumbnail", "", "   ", "untitled-{n}.png", "photo"]


def caption(rng: random.Random) -> str:
    if rng.random() < 0.25:
        color = rng.choice(ADJECTIVES).title()
        return f"{color} {rng.choice(PRODUCTS)} - {rng.choice(SUBJECTS).title()} Print, Size {rng.choice('SML')}"
    return (f"a {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} "
            f"{rng.choice(PLACES)}")


def noisy_caption(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.08:
        return rng.choice(JUNK).format(n=rng.randint(100, 9999), m=rng.randint(100, 2000))
    if draw < 0.10:
        return rng.choice(SUBJECTS)  # one word
    if draw < 0.11:
        return " ".join(caption(rng) for _ in range(60))  # overlong
    if draw < 0.115:
        return caption(rng) + "\x07"
    return caption(rng)


def write_demo_pool(path: str, rows: int = 20_000, seed: int = 0) -> int:
    """Write the pool as CSV (``url``, ``caption``); return the number of lines written."""
    rng = random.Random(seed)
    written = 0
    recent: list[tuple[str, str]] = []
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(rows):
            if recent and rng.random() < 0.04:
                pair = rng.choice(recent)  # an exact duplicate, as crawls repeat pages
            else:
                pair = (f"https://demo.invalid/img/{i:06d}.jpg", noisy_caption(rng))
                recent = (recent + [pair])[-500:]
            writer.writerow(pair)
            written += 1
            if rng.random() < 0.0005:
                f.write("https://demo.invalid/broken,a caption,with,too many fields\n")
                written += 1
    return written
