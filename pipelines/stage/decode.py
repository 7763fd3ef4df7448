"""Checking and re-encoding downloaded bytes: Pillow reads the header, img2dataset resizes.

Before any pixel is decoded, :func:`check_header` reads what the file declares and prices it:

- a body Pillow cannot identify is ``not_an_image``;
- more pixels than ``max_pixels``, in the image or in what the resize would make of it (an
  upscale of a 1 x 1000 strip to a 512-pixel short side), is ``decompression_bomb``;
- more memory than ``max_decode_bytes`` to decode and resize it is ``decompression_bomb``: the
  price counts the decoded samples and resize buffers, the resized output, and, where the image
  may carry transparency, img2dataset's alpha blending in float64 (about 80 bytes a pixel). A
  GIF is always priced with transparency: any later frame may set a transparent index, and
  OpenCV then decodes the whole image as BGRA;
- a JPEG with more than ``max_jpeg_scans`` scans is ``decompression_bomb``: every scan of a
  progressive JPEG is another pass over all of its coefficients, so a few kilobytes of repeated
  scans cost minutes (encoders write about ten);
- a JPEG, PNG, GIF or WebP whose end marker is missing is ``decode_error`` (truncated), and so
  is a Huffman-coded JPEG too short to hold the one bit every 8 x 8 block of its declared size
  needs at the least (libjpeg fills what is missing with grey and only warns).

The image is then decoded, resized and encoded by img2dataset's own ``Resizer`` (its resize
modes, interpolation, encode format and quality), unchanged: :class:`Reencoder`. The download
stage runs it in a child process with a memory limit and a deadline
(:mod:`pipelines.download.decode_process`), so what the header cannot price is bounded too.
"""

from __future__ import annotations

import importlib.util
import io
import math
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
DECODE_TIMEOUT = "decode_timeout"
TOO_SMALL = "too_small"

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
ENCODE_FORMATS = ("jpg", "png", "webp")
#: Pillow's own default limit (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
#: Memory one image may take while it is decoded and resized.
DEFAULT_MAX_DECODE_BYTES = 2 * 1024**3
#: Scans a progressive JPEG may have (libjpeg's standard progression has 10 for colour images).
DEFAULT_MAX_JPEG_SCANS = 100
# Bytes a pixel costs through img2dataset's resizer: decoded samples and resize buffers, or,
# with transparency, the float64 arrays of its alpha blending.
_BYTES_PER_SAMPLE = {
    "1": 1,
    "L": 1,
    "P": 1,
    "RGB": 1,
    "RGBA": 1,
    "LA": 1,
    "CMYK": 1,
    "YCbCr": 1,
    "I;16": 2,
    "I;16B": 2,
    "I;16L": 2,
    "I": 4,
    "F": 4,
}
_ALPHA_BYTES_PER_PIXEL = 80
# The resized image and the encoder's buffer, 3 bytes a pixel each, plus the resizer's own.
_OUTPUT_BYTES_PER_PIXEL = 9
# JPEG start-of-frame markers of Huffman-coded DCT images (baseline, extended, progressive): every
# block's DC coefficient takes a code of at least one bit in these.
_HUFFMAN_DCT_FRAMES = (0xC0, 0xC1, 0xC2)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC are not frames
_SOS = 0xDA

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


@dataclass(frozen=True)
class ResizeSettings:
    """How img2dataset's resizer is asked to resize and encode (see ``Download``)."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {list(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format {self.encode_format!r} is not one of {list(ENCODE_FORMATS)}")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The largest image the resizer makes on the way from ``width`` x ``height`` (before a crop)."""
        if self.resize_mode == "no" or not width or not height:
            return width, height
        side = min(width, height) if self.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
        if self.resize_only_if_bigger and side <= self.image_size:
            return width, height
        scale = self.image_size / side
        out = max(1, round(width * scale)), max(1, round(height * scale))
        if self.resize_mode == "border":  # padded to a square
            return max(out[0], self.image_size), max(out[1], self.image_size)
        return out


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost to decode: pixels, memory, JPEG scans."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS


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


def check_header(
    body: bytes, limits: DecodeLimits = DecodeLimits(), resize: ResizeSettings | None = None
) -> tuple[str, int, int]:
    """The format and size of ``body`` from its header, or :class:`ImageRejected` (see the module
    docstring); ``resize`` adds what the resizer will make of the image to the price."""
    if not body:
        raise ImageRejected(NOT_AN_IMAGE, "empty body")
    try:
        with Image.open(io.BytesIO(body)) as image:
            fmt, (width, height) = image.format, image.size
            per_pixel = _bytes_per_pixel(image)
    except Image.DecompressionBombError as e:
        raise ImageRejected(DECOMPRESSION_BOMB, str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected(NOT_AN_IMAGE, f"not a known image format; starts with {body[:24]!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(DECODE_ERROR, f"unreadable header: {e}") from None
    out_width, out_height = resize.output_size(width, height) if resize else (0, 0)
    for w, h, what in ((width, height, ""), (out_width, out_height, " after resizing")):
        if w * h > limits.max_pixels:
            raise ImageRejected(
                DECOMPRESSION_BOMB, f"{w}x{h}{what} = {w * h:,} pixels > max_pixels={limits.max_pixels:,}"
            )
    cost = width * height * per_pixel + out_width * out_height * _OUTPUT_BYTES_PER_PIXEL
    if cost > limits.max_decode_bytes:
        resized = f" and resizing it to {out_width}x{out_height}" if (out_width, out_height) != (width, height) else ""
        raise ImageRejected(
            DECOMPRESSION_BOMB,
            f"decoding {width}x{height}{resized} would take about {cost / 1024**3:.1f} GiB "
            f"> max_decode_bytes={limits.max_decode_bytes:,}",
        )
    if fmt in ("JPEG", "MPO"):
        _check_jpeg(body, limits.max_jpeg_scans)
    if _truncated(fmt, body):
        raise ImageRejected(DECODE_ERROR, f"truncated {fmt}: its end marker is missing")
    return fmt, width, height


def _bytes_per_pixel(image: Image.Image) -> int:
    if "A" in image.getbands() or "transparency" in image.info or image.format == "GIF":
        return _ALPHA_BYTES_PER_PIXEL
    samples = len(image.getbands()) if image.mode != "P" else 3  # a palette decodes to BGR
    return 3 * samples * _BYTES_PER_SAMPLE.get(image.mode, 4)  # decoded + resize buffers


def _check_jpeg(body: bytes, max_scans: int) -> None:
    scans = body.count(b"\xff\xda")  # entropy-coded data never holds a marker; an EXIF thumbnail adds its own
    if scans > max_scans:
        raise ImageRejected(
            DECOMPRESSION_BOMB,
            f"{scans:,} JPEG scans > max_jpeg_scans={max_scans}: each scan is another pass over the whole image",
        )
    frame = _jpeg_frame(body)
    if frame is None:
        return
    marker, blocks = frame
    if marker in _HUFFMAN_DCT_FRAMES and len(body) * 8 < blocks:
        raise ImageRejected(
            DECODE_ERROR,
            f"truncated JPEG: {len(body):,} bytes cannot hold the {blocks:,} blocks "
            f"its header declares (at least one bit each)",
        )


def _jpeg_frame(body: bytes) -> tuple[int, int] | None:
    """The start-of-frame marker of a JPEG and the block count of its largest component, from
    the segments before the first scan; None if they cannot be walked."""
    position = 2  # after SOI
    while position + 4 <= len(body):
        if body[position] != 0xFF:
            return None
        marker = body[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(body[position + 2 : position + 4], "big")
        if marker == _SOS or length < 2:
            return None
        if marker in _SOF_MARKERS:
            return marker, _frame_blocks(body[position + 4 : position + 2 + length])
        position += 2 + length
    return None


def _frame_blocks(segment: bytes) -> int:
    """8 x 8 blocks of the frame's largest component (from its sampling factors)."""
    if len(segment) < 6:
        return 0
    height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
    factors = [
        (segment[6 + 3 * i + 1] >> 4, segment[6 + 3 * i + 1] & 15) for i in range(count) if 6 + 3 * i + 1 < len(segment)
    ]
    if not factors or not height:  # the height may come later, in a DNL segment
        return 0
    h_max, v_max = max(h for h, _ in factors) or 1, max(v for _, v in factors) or 1
    return max(
        math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8) for h, v in factors
    )


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
    """img2dataset's decode → resize → encode of a body that passed :func:`check_header`
    (not thread-safe: one per thread).

    img2dataset's Resizer silences C libraries by redirecting file descriptors 1 and 2 while it
    runs, which is not safe from several threads at once; callers use it from one thread.
    """

    def __init__(self, resize: ResizeSettings) -> None:
        self.resizer = load_img2dataset_resizer().Resizer(
            image_size=resize.image_size,
            resize_mode=resize.resize_mode,
            resize_only_if_bigger=resize.resize_only_if_bigger,
            encode_format=resize.encode_format,
            encode_quality=resize.encode_quality,
            min_image_size=resize.min_image_size,
        )

    def __call__(self, body: bytes) -> Encoded:
        data, width, height, original_width, original_height, error = self.resizer(io.BytesIO(body))
        if error is not None:
            reason = TOO_SMALL if error == "image too small" else DECODE_ERROR
            raise ImageRejected(reason, error)
        return Encoded(data, width, height, original_width, original_height)


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own pixel limit to ``max_pixels`` where it is lower, so that Pillow does not
    refuse a header that :func:`check_header` is to judge."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_to_pixels(
    bodies: list[bytes | None], transform: Callable[[Image.Image], Image.Image], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[bytes | None], list[tuple[int, str, str]]]:
    """Decode each image and apply ``transform`` (PIL in, PIL RGB out) for a model's input:
    the uint8 HWC bytes of each result, and ``(row, reason, detail)`` for those that failed
    (``not_an_image``, ``decompression_bomb``, ``decode_error``), whose pixels are None."""
    pixels: list[bytes | None] = []
    failures: list[tuple[int, str, str]] = []
    limits = DecodeLimits(max_pixels=max_pixels)
    for i, body in enumerate(bodies):
        try:
            if body is None:
                raise ImageRejected(NOT_AN_IMAGE, "no image bytes")
            check_header(body, limits)
            with Image.open(io.BytesIO(body)) as image:
                pixels.append(np.asarray(transform(image), dtype=np.uint8).tobytes())
        except ImageRejected as e:
            failures.append((i, e.reason, e.detail))
            pixels.append(None)
        except (OSError, SyntaxError, ValueError) as e:
            failures.append((i, DECODE_ERROR, f"{type(e).__name__}: {e}"))
            pixels.append(None)
    return pixels, failures
