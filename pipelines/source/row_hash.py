"""Row uids: XXH3-128 of each row's position, url and caption, a column at a time.

The uid of a row is the canonical (big-endian) XXH3-128 digest of ``"<position>\\x1f<url>\\x1f<caption>"``
in UTF-8, as 32 lowercase hex digits: ``xxhash.xxh3_128_hexdigest(key)`` in any tool recomputes it.
The digests are taken by xxHash's C code value by value and assembled into the Arrow column
without a Python string per row (a numpy XXH64 that advances every row together was measured
slower: the work per row is too small for numpy's per-call cost).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import xxhash

#: The uid scheme, part of a run's fingerprint: a run made under another scheme is not resumed
#: (v1 was blake2b-128 of the same key).
UID_SCHEME = "xxh3-128-v2"

_DIGEST_BYTES = 16
_HEX = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint16)


def row_uids(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The uid (32 hex digits) of each key of a non-null binary or string array."""
    if keys.null_count:
        raise ValueError("row uids take no null keys")
    digests = b"".join(map(xxhash.xxh3_128_digest, keys.cast(pa.binary()).to_pylist()))
    digits = _HEX[np.frombuffer(digests, dtype=np.uint8)]  # two hex digits per byte
    width = 2 * _DIGEST_BYTES
    offsets = np.arange(0, width * len(keys) + 1, width, dtype=np.int64)
    uids = pa.Array.from_buffers(
        pa.large_string(), len(keys), [None, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())]
    )
    return uids.cast(pa.string())
