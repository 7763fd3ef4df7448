"""The import rules of ``pyproject.toml`` (import-linter) are a check that fails on a bad import."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "curation", "generators", "models", "schemas")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_project(into: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, into / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", into / "pyproject.toml")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy, ahead of the editable install
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: `make install` installs import-linter (the dev extra)")
    root = tmp_path_factory.mktemp("project")
    _copy_project(root)
    return root


def test_the_project_keeps_its_import_rules(project_copy):
    done = _lint_imports(project_copy)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("pipelines/engine/ledger.py", "import curation.basic", "pipelines never imports curation or generators"),
        ("curation/basic.py", "import pipelines.engine.rundir", "reach pipelines only through the stage SDK"),
        ("schemas/columns.py", "import models.clip", "schemas import nothing of the project"),
        ("pipelines/engine/plan.py", "import pipelines.cli.console", "the engine imports none of the rooms"),
        ("curation/basic.py", "import ray", "only in the Ray runner"),
    ],
)
def test_a_planted_bad_import_breaks_its_contract(project_copy, tmp_path, module, planted, contract):
    root = tmp_path / "planted"
    shutil.copytree(project_copy, root)
    target = root / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    done = _lint_imports(root)
    assert done.returncode != 0
    broken = done.stdout[done.stdout.index("Broken contracts") :]
    assert contract in broken, done.stdout[-3000:]


def test_only_the_ray_runner_imports_ray_data():
    importers = set()
    for package in PACKAGES:
        for file in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [f"{node.module}.{a.name}" for a in node.names]
                    if isinstance(node, ast.ImportFrom) and node.module
                    else []
                )
                if any(n == "ray.data" or n.startswith("ray.data.") for n in names):
                    importers.add(file.relative_to(REPO).as_posix())
    assert importers == {"pipelines/engine/runner.py"}


def test_no_test_or_benchmark_imports_a_private_name_of_the_project():
    """What a test reaches is the module's public surface: a private helper stays free to change."""
    private = []
    for folder in ("tests", "benchmarks"):
        for file in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    private += [
                        f"{file.relative_to(REPO)}: {node.module}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_")
                    ]
    assert private == []
