"""How a run identifies a file it read: a digest of its bytes, recorded in the manifest."""

from __future__ import annotations

import hashlib
from typing import BinaryIO


def file_digest(path: str) -> str:
    """blake2b of a local file's bytes: what a model's ``identity`` reports for a checkpoint it reads."""
    with open(path, "rb") as f:
        return stream_digest(f)


def stream_digest(stream: BinaryIO) -> str:
    """blake2b of the bytes a stream gives to its end (a file, or an object read from a store)."""
    digest = hashlib.blake2b(digest_size=16)
    while block := stream.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()
