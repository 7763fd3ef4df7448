"""Prompt templates for zero-shot classification and the class-name clean-up they need."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Our own prompt wording: ``{}`` stands for the class name. Varied in style, framing and image
#: quality so that the mean embedding describes the class rather than one phrasing.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture showing a {}.",
    "an image that contains a {}.",
    "a close-up shot of the {}.",
    "a {} seen from far away.",
    "a blurry snapshot of a {}.",
    "a sharp, well-lit photo of a {}.",
    "a {} photographed at night.",
    "a small {} in the picture.",
    "a large {} filling the frame.",
    "part of a {}, cut off by the frame.",
    "a tiny, pixelated image of a {}.",
    "a pencil sketch of a {}.",
    "a plastic model of a {}.",
    "a snapshot someone took of their {}.",
    "there is a {} in this image.",
    "a {} in its usual surroundings.",
    "a {} in a grayscale photograph.",
)

_SPACES = re.compile(r"\s+")


def prettify_classname(name: str) -> str:
    """A folder-style class name as words: underscores become spaces, runs of spaces collapse."""
    return _SPACES.sub(" ", name.replace("_", " ")).strip()


def fill_templates(classname: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """The prompts for one class: every template with the prettified class name filled in."""
    pretty = prettify_classname(classname)
    return [template.format(pretty) for template in templates]
