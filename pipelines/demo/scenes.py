"""Generated scenes whose captions are exact: coloured shapes on a coloured background.

Scene ``i`` is a deterministic function of ``i``: a background, one to three shapes with
colours and positions, and the caption that says exactly that ("a red circle to the left of a
blue square on a white background"). The boxes are kept for instruction generation later.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 170), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (150, 150, 150), "sky blue": (150, 200, 240),
               "beige": (235, 220, 190), "dark green": (30, 80, 40)}
SHAPES = ("circle", "square", "triangle")


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
        text = f"a {first.color} {first.kind}"
        for previous, shape in zip(self.shapes, self.shapes[1:]):
            text += f" {_relation(previous, shape)} a {shape.color} {shape.kind}"
        return f"{text} on a {self.background} background"


def scene(index: int, width: int = 320, height: int = 240) -> Scene:
    """Scene ``index`` (sizes from 160 x 120 up; smaller images are made by downscaling)."""
    rng = random.Random(index * 7919 + 17)
    background = rng.choice(list(BACKGROUNDS))
    colors = [c for c in COLORS if c != background]
    shapes = []
    for slot in range(rng.randint(1, 3)):
        size = rng.randint(height // 5, height // 3)
        x = int((slot + 0.5) * width / 3 - size / 2 + rng.randint(-15, 15))
        y = rng.randint(10, height - size - 10)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(colors), (x, y, x + size, y + size)))
    return Scene(index, width, height, background, tuple(shapes))


def render(s: Scene, quality: int = 90) -> bytes:
    image = Image.new("RGB", (s.width, s.height), BACKGROUNDS[s.background])
    draw = ImageDraw.Draw(image)
    for shape in s.shapes:
        fill = COLORS[shape.color]
        x1, y1, x2, y2 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=fill)
        else:
            draw.polygon([((x1 + x2) // 2, y1), (x1, y2), (x2, y2)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _relation(a: Shape, b: Shape) -> str:
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(bx - ax) >= abs(by - ay):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"
