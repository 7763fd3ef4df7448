"""Names inside an export: the webdataset key of a uid and the file extension of image bytes.

Both export writers (webdataset tars and LLaVA's layout) name their files with these, so a
sample has the same key in every format.
"""

from __future__ import annotations

import hashlib
import re

_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_HASHED_KEY = re.compile(r"h[0-9a-f]{32}")


def sample_key(uid: str) -> str:
    """A webdataset key for ``uid``: itself when safe, else a stable 128-bit hash of it.

    A uid that has the form of a hashed key (``h`` and 32 hex digits) is hashed too, so that no
    uid kept as it is can equal the hashed key of another.
    """
    if _SAFE_KEY.fullmatch(uid) and not _HASHED_KEY.fullmatch(uid):
        return uid
    return "h" + hashlib.blake2b(uid.encode("utf-8"), digest_size=16).hexdigest()


def image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError(f"image bytes of unknown format (start {data[:12]!r})")
