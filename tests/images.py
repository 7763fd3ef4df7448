"""Hostile images built in memory for the decoding tests: each is small on the wire and costly to decode."""

from __future__ import annotations

import io

from PIL import Image


def animated_gif(size: int) -> bytes:
    """A two-frame GIF of ``size`` x ``size`` whose first frame is opaque and whose second sets a
    transparent index (OpenCV then decodes the whole image as BGRA)."""
    palette = [0, 0, 0, 255, 0, 0] * 128
    first = Image.new("P", (size, size), 0)
    first.putpalette(palette)
    second = Image.new("P", (size, size), 1)
    second.putpalette(palette)
    second.info["transparency"] = 1
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second])
    return buffer.getvalue()


def jpeg(width: int, height: int, *, progressive: bool = False, quality: int = 90) -> bytes:
    """A flat grey JPEG: its coefficients are almost all zero, so its scans are a few bytes each."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(buffer, "JPEG", progressive=progressive, quality=quality)
    return buffer.getvalue()


def repeated_scans(size: int, scans: int) -> bytes:
    """A progressive JPEG with its smallest scan repeated ``scans`` times: each one is another pass
    over every coefficient of the image."""
    data = jpeg(size, size, progressive=True)
    end = data.rfind(b"\xff\xd9")
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    smallest = min((data[a:b] for a, b in zip(starts, starts[1:] + [end])), key=len)
    return data[:end] + smallest * scans + b"\xff\xd9"


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height`` (libjpeg decodes the rest as grey)."""
    data = bytearray(jpeg(64, 64))
    frame = data.find(b"\xff\xc0")
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()
