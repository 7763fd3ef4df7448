"""CIFAR-10 test images for the large pool of ``curation_value.py``, kept apart from the evaluation's.

The split is by the sorted image name within each class (``test/<class>/0000.jpg`` ...
``0999.jpg``): the zero-shot evaluation reads the first ``--per-class`` images of each class in
that order (:class:`models.evaluation.LabelledImageSet`), so the first
:data:`EVAL_PER_CLASS` of each class are the evaluation's (``--per-class`` may not exceed it) and
the pool takes its images from the rest only, the first :data:`POOL_PER_CLASS` of them.
"""

from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path

from PIL import Image

from benchmarks._real_pairs import SHARED

TAR = SHARED / "cifar10" / "test.tar"
#: The first images of each class (by name) that only the evaluation may read.
EVAL_PER_CLASS = 600
#: Images of each class that the large pool takes from the rest.
POOL_PER_CLASS = 400
#: The 32 px images are served 4x larger (bicubic), as a web thumbnail, so the image-size rule
#: (64 px) judges them as it would a small web image, not as the dataset's storage format.
SERVED_SIDE = 128

#: Web alt-text styles: ``{c}`` the class name, ``{C}`` it capitalised, ``{a_c}`` it with its article.
STYLES = (
    "a photo of {a_c}",
    "{C} for sale - free shipping",
    "cute {c} picture",
    "my {c}",
    "{c} hd wallpaper",
    "closeup of {a_c} on the grass",
    "{C} stock image",
    "the {c} we saw today",
    "{a_c} in the wild",
    "best {c} photos of the year",
    "look at this {c}!",
    "vintage {c} postcard",
)

#: Words that name each class, to keep a mismatched caption from naming the image's own class.
CLASS_WORDS = {
    "airplane": {"airplane", "plane", "aeroplane", "jet", "aircraft"},
    "automobile": {"automobile", "car"},
    "bird": {"bird"},
    "cat": {"cat", "kitten"},
    "deer": {"deer"},
    "dog": {"dog", "puppy"},
    "frog": {"frog"},
    "horse": {"horse", "pony"},
    "ship": {"ship", "boat"},
    "truck": {"truck"},
}


def pool_images(per_class: int = POOL_PER_CLASS) -> list[tuple[str, bytes]]:
    """``(class, served JPEG)`` for the pool's CIFAR-10 images, class by class, in name order."""
    with tarfile.open(TAR) as tar:
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".jpg"):
                by_class.setdefault(Path(member.name).parent.name, []).append(member)
        chosen = [
            (name, member)
            for name in sorted(by_class)
            for member in sorted(by_class[name], key=lambda m: m.name)[EVAL_PER_CLASS:][:per_class]
        ]
        return [(name, _served(tar.extractfile(member).read())) for name, member in chosen]


def _served(body: bytes) -> bytes:
    with Image.open(io.BytesIO(body)) as image:
        image = image.convert("RGB").resize((SERVED_SIDE, SERVED_SIDE), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        return out.getvalue()


def styled_caption(name: str, rng: random.Random) -> str:
    """A caption of class ``name`` in one of the web alt-text :data:`STYLES`."""
    article = "an" if name[0] in "aeiou" else "a"
    return rng.choice(STYLES).format(c=name, C=name.capitalize(), a_c=f"{article} {name}")


def names_class(caption: str, name: str) -> bool:
    """Whether ``caption`` names class ``name`` (a word of :data:`CLASS_WORDS`, singular or plural)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return bool(CLASS_WORDS[name] & (words | {w[:-1] for w in words if w.endswith("s")}))
