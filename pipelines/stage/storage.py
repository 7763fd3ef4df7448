"""Where the files a run reads and writes live: a local path, or a URI of an object store or any
filesystem fsspec knows (``s3://``, ``gs://``, ``hf://``, ``abfs://``, ...).

pyarrow's own filesystems serve local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://`` and
``abfs://``; any other scheme goes through fsspec when its package is installed. Credentials and
endpoints come only from the environment and each store's own configuration files
(``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/``~/.aws``, ``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``
for an S3-compatible store, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``), never from the URI:
a URI that carries a user, a password or a query string is refused, so no secret lands in a config
or a manifest.
"""

from __future__ import annotations

import fnmatch
import os
import re
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from schemas.files import stream_digest

#: Schemes pyarrow opens with its own filesystems.
_PYARROW_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_WILDCARDS = "*?["


class StorageError(ValueError):
    """A location that cannot be used as given (its scheme, its form, or the store's answer)."""


#: Words of a store's answer that mean it refused the credentials (S3, GCS, Azure, the Hub).
_REFUSAL = re.compile(
    r"access_?denied|invalid_?access_?key|signature_?does_?not_?match|expired_?token|forbidden|unauthori[sz]ed"
    r"|unauthenticated|permission|\b40[13]\b",
    re.IGNORECASE,
)
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the machine's role)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (or the machine's service account)",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS (or the machine's service account)",
    "abfs": "AZURE_STORAGE_ACCOUNT_KEY or a signed-in Azure identity",
    "abfss": "AZURE_STORAGE_ACCOUNT_KEY or a signed-in Azure identity",
    "hf": "HF_TOKEN",
}


def store_error(location: str, error: Exception) -> StorageError:
    """The store's answer about ``location`` as a :class:`StorageError` naming it; a refusal of the
    credentials says which variables the store's client reads them from."""
    text = str(error)
    scheme = location.partition("://")[0] if is_uri(location) else "file"
    if scheme != "file" and _REFUSAL.search(text.replace(location, "")):
        where = _CREDENTIALS.get(scheme, "the environment and the store's own configuration files")
        return StorageError(
            f"{location}: the store refused the credentials ({text.strip()}). Credentials come from "
            f"{where}; never from the URI."
        )
    return StorageError(f"{location}: {text}")


def is_uri(location: str) -> bool:
    """Whether ``location`` names its scheme (``s3://bucket/key``) rather than being a local path."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


def check_location(location: str) -> None:
    """Refuse a URI that carries credentials or options: they belong in the environment."""
    if not is_uri(location):
        return
    parts = urlsplit(location)
    if "@" in parts.netloc or parts.query:
        raise StorageError(
            f"{_redacted(location)}: a URI names a location only; credentials, endpoints and options come from "
            f"the environment and the store's configuration files (AWS_PROFILE, AWS_ENDPOINT_URL, "
            f"GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN, ...), not from the URI"
        )


def open_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path within it."""
    check_location(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    scheme = location.partition("://")[0].lower()
    if scheme == "s3":
        return _s3(), location.partition("://")[2]
    if scheme in _PYARROW_SCHEMES:
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError) as error:
            raise store_error(location, error) from None
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as error:  # unknown protocol, or its package is not installed
        raise StorageError(
            f"{location}: neither pyarrow nor fsspec can open the scheme {scheme}:// ({error}); use a local path, "
            f"s3://, gs://, hdfs://, abfs://, or install the fsspec implementation for it"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _s3() -> pafs.S3FileSystem:
    """S3 with the endpoint the environment names (an S3-compatible store), which pyarrow's own
    environment lookup leaves out; credentials and region as the AWS SDK finds them."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options = {"endpoint_override": endpoint} if endpoint else {}
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def relocate(location: str, path: str, listed: str) -> str:
    """``listed``, a path from a listing of the filesystem that ``location`` opened as ``path``, as a
    location of the same kind: the URI's scheme and authority kept (``hdfs://host:8020``), and the
    form of its path (``memory://x`` lists as ``/x``)."""
    if not is_uri(location):
        return listed
    tail = path.lstrip("/")
    lead = path[: len(path) - len(tail)]
    body = location.rstrip("/")
    prefix = body[: len(body) - len(tail.rstrip("/"))] if tail else body + "/"
    return prefix + (listed[len(lead) :] if listed.startswith(lead) else listed)


def file_size(location: str) -> int:
    """The size of a file in bytes; :class:`StorageError` naming it when it is not there."""
    fs, path = open_filesystem(location)
    info = _info(fs, path, location)
    if info.type != pafs.FileType.File:
        raise StorageError(
            f"{location} does not exist" if info.type == pafs.FileType.NotFound else f"{location} is not a file"
        )
    return info.size


def kind(location: str) -> str:
    """``file``, ``folder`` or ``missing``."""
    fs, path = open_filesystem(location)
    info = _info(fs, path, location)
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}.get(info.type, "missing")


def list_folder(location: str) -> list[str]:
    """The files directly in a folder, as locations, sorted."""
    fs, path = open_filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    except OSError as error:
        raise store_error(location, error) from None
    return sorted(relocate(location, path, i.path) for i in infos if i.type == pafs.FileType.File)


def glob(location: str) -> list[str]:
    """The files matching a pattern whose wildcards (``*``, ``?``, ``[...]``) stay within a path
    segment each, as locations, sorted."""
    if not is_uri(location):
        import glob as local_glob

        return sorted(f for f in local_glob.glob(location) if os.path.isfile(f))
    fs, pattern = open_filesystem(location)
    segments = pattern.split("/")
    fixed = next(i for i, s in enumerate(segments) if any(c in s for c in _WILDCARDS))
    base = "/".join(segments[:fixed])
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as error:
        raise store_error(location, error) from None
    found = []
    for info in infos:
        parts = info.path.split("/")
        if info.type == pafs.FileType.File and len(parts) == len(segments):
            if all(fnmatch.fnmatchcase(p, s) for p, s in zip(parts, segments)):
                found.append(relocate(location, pattern, info.path))
    return sorted(found)


def open_input_file(location: str) -> pa.NativeFile:
    """A random-access reader of a file (parquet footers, sampled hashes)."""
    fs, path = open_filesystem(location)
    try:
        return fs.open_input_file(path)
    except (OSError, pa.ArrowException) as error:
        raise store_error(location, error) from None


def open_input_stream(location: str) -> pa.NativeFile:
    """A sequential reader of a file, decompressed by its extension (``.gz``, ``.bz2``, ``.zst``, ...)."""
    if not is_uri(location):
        return pa.input_stream(location)
    fs, path = open_filesystem(location)
    try:
        return fs.open_input_stream(path, compression="detect")
    except FileNotFoundError:
        raise StorageError(f"{location!r} does not exist") from None
    except (OSError, pa.ArrowException) as error:
        raise store_error(location, error) from None


def open_stored_bytes(location: str) -> pa.NativeFile:
    """A sequential reader of a file's bytes as stored (no decompression)."""
    fs, path = open_filesystem(location)
    try:
        return fs.open_input_stream(path, compression=None)
    except FileNotFoundError:
        raise StorageError(f"{location!r} does not exist") from None
    except (OSError, pa.ArrowException) as error:
        raise store_error(location, error) from None


def read_bytes(location: str) -> bytes:
    """A whole (small) file: a metadata list, a prompt, a config."""
    with open_stored_bytes(location) as stream:
        return stream.read()


def file_digest(location: str) -> str:
    """blake2b of a file's bytes, wherever it is: what a stage's ``identity`` reports for a file it reads."""
    with open_stored_bytes(location) as stream:
        return stream_digest(stream)


def parent(location: str) -> str:
    """The folder that holds ``location`` (a path made absolute, or a URI)."""
    if is_uri(location):
        return location.rstrip("/").rpartition("/")[0]
    return os.path.dirname(os.path.abspath(location.rstrip("/")))


def absolute(location: str) -> str:
    """``location`` as workers on other machines and in other folders find it: URIs as they are,
    local paths made absolute."""
    return location if is_uri(location) else os.path.abspath(location)


def _info(fs: pafs.FileSystem, path: str, location: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as error:  # no such bucket, wrong credentials, an endpoint that does not answer
        raise store_error(location, error) from None


def _redacted(location: str) -> str:
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
