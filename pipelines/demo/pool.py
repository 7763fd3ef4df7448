"""A url pool with the noise of a real crawl, over the demo's generated scenes.

Deterministic for a seed and a server address. Most rows pair a scene url with its exact
caption; the rest carry what web pools carry: junk alt-text (file names, bare dimensions, urls,
stock words, empty), one-word and overlong captions, control characters, exact duplicate rows,
the same image under another url, near-duplicate images (rescaled, re-encoded), crops of one
real photograph, captions of another image, broken links (404), web pages served as images,
thumbnails too small to use, images whose host opts out of AI use, and a few malformed CSV lines.
The scenes' shapes are head-heavy (see :mod:`pipelines.demo.scenes`).

The third column, ``boxes``, holds the objects of the served image as JSON
(``[{"category", "bbox"}]``, normalised ``x1, y1, x2, y2``), as a detector run over the pool
would give them; a pipeline keeps it with ``columns: {keep: [boxes]}``.
"""

from __future__ import annotations

import csv
import json
import random

from pipelines.demo.scenes import PHOTO_CAPTION, Scene, instances, scene

JUNK = [
    "IMG_{n}.JPG",
    "DSC0{n}.jpg",
    "{n}x{m}",
    "{n} x {m} px",
    "https://demo.invalid/p/{n}",
    "image",
    "thumbnail",
    "",
    "   ",
    "untitled-{n}.png",
    "photo",
]


def noisy_caption(rng: random.Random, caption: str) -> str:
    draw = rng.random()
    if draw < 0.06:
        return rng.choice(JUNK).format(n=rng.randint(100, 9999), m=rng.randint(100, 2000))
    if draw < 0.08:
        return caption.split()[1]  # one word
    if draw < 0.09:
        return " ".join([caption] * 40)  # overlong
    if draw < 0.095:
        return caption + "\x07"
    return caption


def write_demo_pool(path: str, base_url: str, rows: int = 4000, seed: int = 0) -> int:
    """Write the pool as CSV (``url``, ``caption``, ``boxes``); return the number of lines written."""
    rng = random.Random(seed)
    written = 0
    recent: list[tuple[str, str, str]] = []
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption", "boxes"])
        for i in range(rows):
            draw = rng.random()
            own_scene = scene(i)
            own, boxes = own_scene.caption, json.dumps(instances(own_scene))
            if recent and draw < 0.04:
                row = rng.choice(recent)  # the same row again, as crawls repeat pages
            elif i > 10 and draw < 0.07:
                j = rng.randrange(i)  # the same image under another url
                row = _scene_row(f"{base_url}/scene/{j}.jpg?copy={i}", scene(j))
            elif draw < 0.10:
                row = (f"{base_url}/missing/{i}.jpg", own, boxes)
            elif draw < 0.11:
                row = (f"{base_url}/html/{i}.jpg", own, boxes)
            elif draw < 0.12:
                row = (f"{base_url}/tiny/{i}.jpg", own, boxes)
            elif draw < 0.125:
                row = (f"{base_url}/optout/{i}.jpg", own, boxes)
            elif draw < 0.17:
                row = (f"{base_url}/scene/{i}.jpg", scene(i + rows).caption, boxes)  # another image's caption
            elif i > 10 and draw < 0.20:
                j = rng.randrange(i)  # the same picture, rescaled and re-encoded
                row = _scene_row(f"{base_url}/near/{j}.jpg", scene(j))
            elif draw < 0.215:
                row = (f"{base_url}/photo/{i}.jpg", PHOTO_CAPTION, json.dumps([PERSON]))
            else:
                row = (f"{base_url}/scene/{i}.jpg", noisy_caption(rng, own), boxes)
            recent = (recent + [row])[-500:]
            writer.writerow(row)
            written += 1
            if rng.random() < 0.002:
                f.write(f"{base_url}/broken,a caption,with,too many fields\n")
                written += 1
    return written


PERSON = {"category": "woman", "bbox": [0.0, 0.0, 1.0, 1.0]}


def _scene_row(url: str, s: Scene) -> tuple[str, str, str]:
    """A row that pairs ``url`` with scene ``s``'s own caption and boxes."""
    return url, s.caption, json.dumps(instances(s))
