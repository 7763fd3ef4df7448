"""Tests of schemas/files.py: the digest a run records for a file it read."""

from __future__ import annotations

from schemas.files import file_digest


def test_the_digest_follows_the_bytes_not_the_name(tmp_path):
    first, second, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_bytes(b"x" * (3 << 20))  # past one read block
    second.write_bytes(b"x" * (3 << 20))
    other.write_bytes(b"x" * ((3 << 20) - 1) + b"y")
    assert file_digest(str(first)) == file_digest(str(second)) != file_digest(str(other))
    assert len(file_digest(str(first))) == 32
