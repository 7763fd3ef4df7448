"""Generated scenes whose captions are exact: coloured shapes on a coloured background.

Scene ``i`` is a deterministic function of ``i``: a background, one to three shapes with
colours and positions, and the caption that says exactly that ("a red circle to the left of a
blue square on a white background"). Shapes and colours are drawn head-heavy (weights falling
as 1 / rank), as concepts are in a web crawl: circles and squares are common, hexagons and
crosses rare, which gives MetaCLIP's balancing a head to cut and a tail to keep. The boxes
(:func:`instances`, normalised ``[x1, y1, x2, y2]`` per ``"<colour> <shape>"``) feed the
grounded instructions and the object-presence probe.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "grey": (150, 150, 150),
    "sky blue": (150, 200, 240),
    "beige": (235, 220, 190),
    "dark green": (30, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
_SHAPE_WEIGHTS = [1 / rank for rank in range(1, len(SHAPES) + 1)]


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class Scene:
    index: int
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        first = self.shapes[0]
        text = _indefinite(f"{first.color} {first.kind}")
        for previous, shape in zip(self.shapes, self.shapes[1:]):
            text += f" {_relation(previous, shape)} {_indefinite(f'{shape.color} {shape.kind}')}"
        return f"{text} on {_indefinite(self.background)} background"


def _indefinite(words: str) -> str:
    """``words`` after "a", or "an" before a vowel sound ("an orange circle")."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def scene(index: int, width: int = 320, height: int = 240) -> Scene:
    """Scene ``index`` (sizes from 160 x 120 up; smaller images are made by downscaling)."""
    rng = random.Random(index * 7919 + 17)
    background = rng.choice(list(BACKGROUNDS))
    colors = [c for c in COLORS if c != background]
    color_weights = [1 / rank for rank in range(1, len(colors) + 1)]
    shapes = []
    for slot in range(rng.randint(1, 3)):
        size = rng.randint(height // 5, height // 3)
        x = int((slot + 0.5) * width / 3 - size / 2 + rng.randint(-15, 15))
        y = rng.randint(10, height - size - 10)
        kind = rng.choices(SHAPES, _SHAPE_WEIGHTS)[0]
        shapes.append(Shape(kind, rng.choices(colors, color_weights)[0], (x, y, x + size, y + size)))
    return Scene(index, width, height, background, tuple(shapes))


def render(s: Scene, quality: int = 90) -> bytes:
    image = Image.new("RGB", (s.width, s.height), BACKGROUNDS[s.background])
    draw = ImageDraw.Draw(image)
    for shape in s.shapes:
        _draw(draw, shape)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


PHOTO_CAPTION = "a portrait photo of a smiling woman in a dark naval uniform"


def photo_crop(index: int) -> bytes:
    """A crop of the photograph matplotlib ships (``sample_data/grace_hopper.jpg``), by ``index``.

    The crops overlap heavily: near-duplicates of one real photo, as a crawl finds them."""
    import matplotlib

    rng = random.Random(index * 104729 + 3)
    with Image.open(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg") as photo:
        width, height = photo.size
        side = int(min(width, height) * rng.uniform(0.7, 0.95))
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        crop = photo.convert("RGB").crop((x, y, x + side, y + side)).resize((288, 288), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def object_names() -> list[str]:
    """Every ``"<colour> <shape>"`` a scene can hold: the label set its boxes are drawn from."""
    return [f"{color} {kind}" for color in COLORS for kind in SHAPES]


def instances(s: Scene) -> list[dict]:
    """The scene's objects as ``{"category": "<colour> <shape>", "bbox": [x1, y1, x2, y2]}`` in [0, 1]."""
    return [
        {
            "category": f"{shape.color} {shape.kind}",
            "bbox": [
                round(shape.box[0] / s.width, 3),
                round(shape.box[1] / s.height, 3),
                round(shape.box[2] / s.width, 3),
                round(shape.box[3] / s.height, 3),
            ],
        }
        for shape in s.shapes
    ]


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    fill = COLORS[shape.color]
    x1, y1, x2, y2 = shape.box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, y1), (x1, y2), (x2, y2)], fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape.kind == "star":
        points = [
            (
                cx + (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=fill)
    elif shape.kind == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=fill)
    else:  # cross
        arm = (x2 - x1) / 3
        draw.rectangle((x1 + arm, y1, x2 - arm, y2), fill=fill)
        draw.rectangle((x1, y1 + arm, x2, y2 - arm), fill=fill)


def _relation(a: Shape, b: Shape) -> str:
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(bx - ax) >= abs(by - ay):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"
