"""Shared fixtures: hermetic environment, one local Ray per test session, shared data, pipelines."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# No network: libraries must not reach a hub, a registry or a telemetry endpoint.
os.environ.update({
    "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
})
# Ray workers import test-defined stages (tests.*) by module path.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a message saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found: {path} (clone the project beside ../shared)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for the whole test session; RayRunner reuses it."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="vlmc-ray-", dir="/tmp")
    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, _temp_dir=temp_dir, configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def runner_factory(request):
    """``runner_factory("local" | "ray")``: a runner; the Ray one uses the session's Ray."""
    from pipelines.runner import LocalRunner, RayRunner

    def make(kind: str):
        if kind == "ray":
            request.getfixturevalue("ray_session")
            return RayRunner()
        return LocalRunner()

    return make


def run_pipeline_dict(raw: dict, runner) -> tuple:
    """Validate a config dict, build its plan and run it; return (plan, manifest)."""
    from pipelines.config import parse_config
    from pipelines.execute import run_pipeline
    from pipelines.plan import build_plan

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
