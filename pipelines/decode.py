"""Checking and re-encoding downloaded bytes: Pillow reads the header, img2dataset resizes.

Before any pixel is decoded, Pillow reads the image header: a body it cannot identify is
``not_an_image``; more pixels than ``max_pixels``, or more memory than ``max_decode_bytes`` to
decode and resize (estimated from size, bands, bit depth and transparency: img2dataset blends
alpha in float64, about 80 bytes a pixel) is ``decompression_bomb`` (a rejection, the worker
lives on); a JPEG, PNG, GIF or WebP whose end marker is missing is ``decode_error``
(truncated). The image is then decoded, resized and encoded by img2dataset's own ``Resizer``
(its resize modes, interpolation, encode format and quality), unchanged.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from PIL import Image, UnidentifiedImageError

NOT_AN_IMAGE = "not_an_image"
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
ENCODE_FORMATS = ("jpg", "png", "webp")
#: Pillow's own default limit (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
#: Memory one image may take while it is decoded and resized.
DEFAULT_MAX_DECODE_BYTES = 2 * 1024**3
# Bytes a pixel costs through img2dataset's resizer: decoded samples and resize buffers, or,
# with transparency, the float64 arrays of its alpha blending.
_BYTES_PER_SAMPLE = {"1": 1, "L": 1, "P": 1, "RGB": 1, "RGBA": 1, "LA": 1, "CMYK": 1, "YCbCr": 1,
                     "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
_ALPHA_BYTES_PER_PIXEL = 80

# We compare sizes against max_pixels ourselves, right after reading the header.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(Exception):
    """A downloaded body that is not a usable image, with the reason for the reject record."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Encoded:
    """An image as stored: encoded bytes, their size, and the size it was downloaded at."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def load_img2dataset_resizer() -> ModuleType:
    """img2dataset's ``resizer`` module, loaded without the package ``__init__``.

    ``import img2dataset.resizer`` runs the package's ``__init__``, which imports its whole CLI
    (webdataset, torch, wandb): 6-7 s per worker instead of about 2 s for the resizer alone.
    """
    # albumentations (imported by the resizer) asks PyPI for a newer version on import otherwise.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or spec.origin is None:
        raise ImportError("img2dataset is not installed: pip install -e . installs it")
    path = os.path.join(os.path.dirname(spec.origin), "resizer.py")
    module_spec = importlib.util.spec_from_file_location("vlmcurate_img2dataset_resizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def check_header(body: bytes, max_pixels: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
                 ) -> tuple[str, int, int]:
    """The format and size of ``body`` from its header, or :class:`ImageRejected`."""
    if not body:
        raise ImageRejected(NOT_AN_IMAGE, "empty body")
    try:
        with Image.open(io.BytesIO(body)) as image:
            fmt, (width, height) = image.format, image.size
            cost = width * height * _bytes_per_pixel(image)
    except Image.DecompressionBombError as e:
        raise ImageRejected(DECOMPRESSION_BOMB, str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected(NOT_AN_IMAGE, f"not a known image format; starts with {body[:24]!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(DECODE_ERROR, f"unreadable header: {e}") from None
    if width * height > max_pixels:
        raise ImageRejected(DECOMPRESSION_BOMB,
                            f"{width}x{height} = {width * height:,} pixels > max_pixels={max_pixels:,}")
    if cost > max_decode_bytes:
        raise ImageRejected(DECOMPRESSION_BOMB, f"decoding {width}x{height} would take about {cost / 1024**3:.1f} GiB "
                                                f"> max_decode_bytes={max_decode_bytes:,}")
    if _truncated(fmt, body):
        raise ImageRejected(DECODE_ERROR, f"truncated {fmt}: its end marker is missing")
    return fmt, width, height


def _bytes_per_pixel(image: Image.Image) -> int:
    if "A" in image.getbands() or "transparency" in image.info:
        return _ALPHA_BYTES_PER_PIXEL
    samples = len(image.getbands()) if image.mode != "P" else 3  # a palette decodes to BGR
    return 3 * samples * _BYTES_PER_SAMPLE.get(image.mode, 4)  # decoded + resize buffers


def _truncated(fmt: str | None, body: bytes) -> bool:
    if fmt in ("JPEG", "MPO"):
        # The end-of-image marker must follow the last start-of-scan (an EXIF thumbnail has its
        # own pair earlier in the file; entropy-coded data never contains either marker).
        scan = body.rfind(b"\xff\xda")
        return scan == -1 or body.find(b"\xff\xd9", scan) == -1
    if fmt == "PNG":  # the IEND chunk with its fixed CRC; bytes after it are harmless
        return body.rfind(b"IEND\xaeB`\x82") == -1
    if fmt == "GIF":
        return body.rstrip(b"\x00\r\n\t ")[-1:] != b";"
    if fmt == "WEBP":
        return int.from_bytes(body[4:8], "little") + 8 > len(body)
    return False


class Reencoder:
    """Header check, then img2dataset's decode → resize → encode (not thread-safe: one per thread).

    img2dataset's Resizer silences C libraries by redirecting file descriptors 1 and 2 while it
    runs, which is not safe from several threads at once; callers use it from one thread.
    """

    def __init__(self, *, image_size: int, resize_mode: str, resize_only_if_bigger: bool, encode_format: str,
                 encode_quality: int, min_image_size: int, max_pixels: int,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> None:
        resizer = load_img2dataset_resizer()
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):  # Pillow must not refuse what we allow
            Image.MAX_IMAGE_PIXELS = max_pixels
        self.resizer = resizer.Resizer(
            image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
            encode_format=encode_format, encode_quality=encode_quality, min_image_size=min_image_size,
        )

    def __call__(self, body: bytes) -> Encoded:
        check_header(body, self.max_pixels, self.max_decode_bytes)
        data, width, height, original_width, original_height, error = self.resizer(io.BytesIO(body))
        if error is not None:
            reason = TOO_SMALL if error == "image too small" else DECODE_ERROR
            raise ImageRejected(reason, error)
        return Encoded(data, width, height, original_width, original_height)


def decode_to_pixels(bodies: list[bytes | None], transform: Callable[[Image.Image], Image.Image],
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[bytes | None], list[tuple[int, str, str]]]:
    """Decode each image and apply ``transform`` (PIL in, PIL RGB out) for a model's input:
    the uint8 HWC bytes of each result, and ``(row, reason, detail)`` for those that failed
    (``not_an_image``, ``decompression_bomb``, ``decode_error``), whose pixels are None."""
    pixels: list[bytes | None] = []
    failures: list[tuple[int, str, str]] = []
    for i, body in enumerate(bodies):
        try:
            if body is None:
                raise ImageRejected(NOT_AN_IMAGE, "no image bytes")
            check_header(body, max_pixels, DEFAULT_MAX_DECODE_BYTES)
            with Image.open(io.BytesIO(body)) as image:
                pixels.append(np.asarray(transform(image), dtype=np.uint8).tobytes())
        except ImageRejected as e:
            failures.append((i, e.reason, e.detail))
            pixels.append(None)
        except (OSError, SyntaxError, ValueError) as e:
            failures.append((i, DECODE_ERROR, f"{type(e).__name__}: {e}"))
            pixels.append(None)
    return pixels, failures
