"""Shared fixtures: hermetic environment, one local Ray per test session, shared data, pipelines."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
INTEGRATION = Path(__file__).resolve().parent / "integration"

# No network: libraries must not reach a hub, a registry or a telemetry endpoint.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
)
# Ray workers import test-defined stages (tests.*) by module path.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(items):
    """Every test under tests/integration/ (whole pipelines, clusters, killed processes) is marked
    ``integration``, and no other: ``-m "not integration"`` is the fast part of the suite."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data. Where it is absent the test is skipped with a message saying
    what is missing, except in CI (``CI`` set), where the data is part of the set-up and its
    absence fails the test."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared test data not found: {path} (clone the project beside ../shared)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for the whole test session, started by ``RayRunner`` itself with
    the settings a run uses; every ``RayRunner`` of the session joins it."""
    import ray

    from pipelines.engine.config import RayConfig
    from pipelines.engine.runner import RayRunner

    temp_dir = tempfile.mkdtemp(prefix="vlmc-ray-", dir="/tmp")
    runner = RayRunner(RayConfig(num_cpus=2, object_store_memory=256 * 1024 * 1024, temp_dir=temp_dir))
    runner.start()
    yield ray
    runner.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


#: `vlmcurate demo` at a small scale: a smaller pool and a few steps per model.
DEMO_SMALL = [
    "bootstrap_scenes=96",
    "clip.batch_size=32",
    "clip.max_steps=20",
    "clip.save_every=20",
    "vlm_stage1.max_steps=2",
    "vlm_stage1.batch_size=2",
    "vlm_stage1.projector_warmup.epochs=2",
    "vlm_stage2.max_steps=2",
    "vlm_stage2.batch_size=1",
    "eval.heldout_images=3",
]


def run_demo(output_dir: Path, *extra: str, port: int | None = None, timeout: int = 900):
    """``vlmcurate demo`` in a subprocess, as ``make demo`` runs it, at :data:`DEMO_SMALL` scale."""
    import subprocess
    import sys

    vlmcurate = str(Path(sys.executable).parent / "vlmcurate")
    return subprocess.run(
        [vlmcurate, "demo", *DEMO_SMALL, "--output-dir", str(output_dir), "--port", str(port or free_port()), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class DemoRun:
    """A finished demo: its output folder, the image host's port its pool names, what it printed."""

    folder: Path
    port: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The suite's one run of the whole demo (on Ray, 500 pool rows). Tests read it and must not
    change it; the rerun test goes last in its module."""
    folder, port = tmp_path_factory.mktemp("demo"), free_port()
    done = run_demo(folder, "--rows", "500", port=port)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return DemoRun(folder, port, done.stdout, done.stderr)


@pytest.fixture
def runner_factory(request):
    """``runner_factory("local" | "ray")``: a runner; the Ray one uses the session's Ray."""
    from pipelines.engine.runner import LocalRunner, RayRunner

    def make(kind: str):
        if kind == "ray":
            request.getfixturevalue("ray_session")
            return RayRunner()
        return LocalRunner()

    return make


def run_pipeline_dict(raw: dict, runner) -> tuple:
    """Validate a config dict, build its plan and run it; return (plan, manifest)."""
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.job import build_plan

    plan = build_plan(parse_config(raw))
    return plan, run_pipeline(plan, runner)


def read_phase(run_dir: str | Path, phase: str):
    """All rows of a phase of a run, as one pyarrow table sorted by source_index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(run_dir, phase).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("source_index")


def read_rejects(run_dir: str | Path):
    """All reject records of a run (every phase), sorted by uid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(run_dir, "rejects").glob("*/*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive").sort_by("uid")


#: Host of the urls in text-only test pools: reserved, never resolved (no stage downloads them).
TEXT_ONLY_HOST = "https://demo.invalid"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
