"""How a run identifies a file it read: a digest of its bytes, recorded in the manifest."""

from __future__ import annotations

import hashlib


def file_digest(path: str) -> str:
    """blake2b of a file's bytes: what a stage's ``identity`` reports for a file it reads."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
