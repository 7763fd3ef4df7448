"""LocalRunner and RayRunner: identical rows, setup once per worker, GPU fallback, failures, step names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.demo.pool import write_demo_pool
from pipelines.stage import Stage
from schemas.manifest import Manifest
from tests.conftest import TEXT_ONLY_HOST, read_phase, read_rejects, run_pipeline_dict
from tests.stages import CAPTION_WORDS, SETUP_CALLS


def _config(tmp_path, pool, name, stages, shard_size=700):
    return {
        "name": name,
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": shard_size,
        "stages": stages,
    }


MIXED_STAGES = [
    {"stage": "curation.basic:CaptionCharacters"},
    {"stage": "curation.basic:JunkAltText"},
    {"stage": "tests.stages:CountSetup", "resources": {"batch_size": 256, "concurrency": 2}},
    {"stage": "curation.dedup:ExactDuplicates"},
    {"stage": "tests.stages:RejectOddWords", "resources": {"batch_size": 100}},
    {"stage": "curation.basic:CaptionLength", "checkpoint": True},
]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.csv"
    write_demo_pool(str(path), TEXT_ONLY_HOST, rows=5000, seed=3)
    return path


def test_local_and_ray_runners_produce_identical_rows_and_rejects(tmp_path, pool, runner_factory):
    results = {}
    for kind in ("local", "ray"):
        plan, manifest = run_pipeline_dict(_config(tmp_path, pool, f"mixed-{kind}", MIXED_STAGES), runner_factory(kind))
        assert manifest.status == "complete"
        results[kind] = (read_phase(plan.run_uri, manifest.final_phase), read_rejects(plan.run_uri), manifest)
    (local_rows, local_rejects, local_m), (ray_rows, ray_rejects, ray_m) = results["local"], results["ray"]
    assert local_rows.num_rows > 0
    assert local_rows.equals(ray_rows)
    assert local_rejects.equals(ray_rejects)
    assert {k: v.to_dict() for k, v in local_m.stage_totals().items()} == {
        k: v.to_dict() for k, v in ray_m.stage_totals().items()
    }
    # Every reason the mixed pipeline can produce actually occurred, so the comparison covered them.
    reasons = set(local_rejects["reason"].to_pylist())
    assert {"malformed_row", "duplicate", "odd_words", "filename_caption"} <= reasons
    assert set(local_rows.column_names) >= {SETUP_CALLS, CAPTION_WORDS}


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_setup_runs_once_per_worker(tmp_path, pool, runner_factory, kind):
    plan, manifest = run_pipeline_dict(
        _config(
            tmp_path, pool, f"setup-{kind}", [{"stage": "tests.stages:CountSetup", "resources": {"batch_size": 64}}]
        ),
        runner_factory(kind),
    )
    rows = read_phase(plan.run_uri, manifest.final_phase)
    assert pc.unique(rows[SETUP_CALLS]).to_pylist() == [1]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_gpu_request_falls_back_to_cpu_with_a_warning_where_there_is_no_gpu(
    tmp_path, pool, runner_factory, caplog, kind
):
    import os

    import torch

    if kind == "local" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the local runner uses it")
    stages = [{"stage": "tests.stages:CountSetup", "resources": {"gpus": 1, "concurrency": 1}}]
    plan, manifest = run_pipeline_dict(_config(tmp_path, pool, f"gpu-{kind}", stages), runner_factory(kind))
    assert manifest.status == "complete"
    cpus = 2 if kind == "ray" else os.cpu_count()  # the Ray node's CPUs, or the machine's
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert (
        f"stage 'count_setup' asks for a GPU (resources.gpus 1) but this {'Ray cluster' if kind == 'ray' else 'machine'}"
        f" has none: its model runs on {cpus} CPU core(s)" in warning.getMessage()
    )


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_failing_stage_fails_the_run_and_never_marks_its_shard_done(tmp_path, pool, runner_factory, kind):
    stages = [{"stage": "curation.basic:CaptionLength"}, {"stage": "tests.stages:FailOnIndex", "source_index": 4500}]
    with pytest.raises(Exception, match="boom on row 4500"):
        run_pipeline_dict(_config(tmp_path, pool, f"fail-{kind}", stages, shard_size=1000), runner_factory(kind))
    run_dir = tmp_path / "runs" / f"fail-{kind}"
    assert Manifest.from_json((run_dir / "manifest.json").read_text()).status == "failed"
    done = {p.name for p in (run_dir / "01_fail_on_index" / "_ledger").glob("*.json")}
    assert "00004.json" not in done  # rows 4000-4999 (input rows, malformed lines included)
    if kind == "local":  # in order: every earlier shard was finished and recorded
        assert done == {f"{i:05d}.json" for i in range(4)}


def test_a_stage_that_kills_its_worker_fails_the_run_instead_of_retrying_forever(tmp_path, pool, runner_factory):
    stages = [{"stage": "tests.stages:DieInCall"}]
    with pytest.raises(Exception):  # noqa: B017 - Ray's error type for a dead actor varies
        run_pipeline_dict(_config(tmp_path, pool, "die", stages, shard_size=5000), runner_factory("ray"))
    assert Manifest.from_json((tmp_path / "runs" / "die" / "manifest.json").read_text()).status == "failed"


def test_a_worker_that_dies_once_is_replaced_and_the_run_says_so(tmp_path, pool, runner_factory, caplog):
    stages = [{"stage": "tests.stages:DieOnce", "marker": str(tmp_path / "died")}]
    plan, manifest = run_pipeline_dict(
        _config(tmp_path, pool, "die-once", stages, shard_size=5000), runner_factory("ray")
    )
    assert manifest.status == "complete" and manifest.phases[-1].rows_out == manifest.phases[0].rows_out
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        "1 Ray worker(s) died during phase 01_die_once and Ray ran their work again, "
        "restarting the actors of die_once (SYSTEM_ERROR: "
    ), warning


def test_placement_scales_cpu_requests_when_stateful_stages_do_not_fit(caplog):
    caplog.set_level("INFO")
    from pipelines.engine.chain import PlannedStage
    from pipelines.engine.placement import plan_placement
    from tests.stages import CountSetup, Slow

    stages = [PlannedStage("a", CountSetup()), PlannedStage("b", Slow())]
    tight = plan_placement(stages, cluster_cpus=2, has_gpu=False)
    assert tight.cpu_scale == pytest.approx(2 / 3)  # two 1-CPU actors + one task's CPU on 2 CPUs
    assert tight.pools == {"a": (1, 1), "b": (1, 1)}
    assert "scaling the phase's CPU requests" in caplog.text
    roomy = plan_placement(stages, cluster_cpus=8, has_gpu=False)
    assert roomy.cpu_scale == 1.0
    assert roomy.pools == {"a": (1, 6), "b": (1, 6)}  # 8 - 1 reserved - 1 for the other pool
    # Two nodes of one CPU: an actor on each at 2/3 would leave each node 1/3, too little for a
    # task at 2/3; everything must fit on one node.
    nodes = plan_placement(stages, cluster_cpus=2, has_gpu=False, node_cpus=1)
    assert nodes.cpu_scale == pytest.approx(1 / 3)
    assert plan_placement(stages, cluster_cpus=16, has_gpu=False, node_cpus=8).cpu_scale == 1.0


def test_placement_scales_memory_requests_that_do_not_fit(caplog):
    caplog.set_level("INFO")
    from pipelines.engine.chain import PlannedStage
    from pipelines.engine.placement import plan_placement
    from pipelines.stage import GiB, Resources
    from tests.stages import CountSetup, Slow

    stages = [
        PlannedStage("a", CountSetup(resources=Resources(memory=3 * GiB))),
        PlannedStage("b", Slow(resources=Resources(memory=2 * GiB))),
        PlannedStage("c", Slow()),
    ]
    assert plan_placement(stages, cluster_cpus=8, has_gpu=False, cluster_memory=8 * GiB).memory_scale == 1.0
    tight = plan_placement(stages, cluster_cpus=8, has_gpu=False, cluster_memory=5 * GiB)
    assert tight.memory_scale == pytest.approx(0.8)  # 5 GiB declared, 80% of 5 GiB granted
    assert "declare 5.0 GiB of memory, more than 80% of the 5.0 GiB this Ray has" in caplog.text


def test_a_stage_declaring_more_memory_than_ray_has_still_runs(tmp_path, pool, runner_factory, caplog):
    caplog.set_level("INFO")
    stages = [{"stage": "tests.stages:CountSetup", "resources": {"memory": 2**50, "concurrency": 1}}]
    plan, manifest = run_pipeline_dict(
        _config(tmp_path, pool, "memory", stages, shard_size=5000), runner_factory("ray")
    )
    assert manifest.status == "complete"
    assert "stages ['count_setup'] declare 1048576.0 GiB of memory" in caplog.text


def test_a_gpu_stage_on_a_cluster_without_gpus_is_granted_the_node_cpus():
    from pipelines.engine.chain import PlannedStage
    from pipelines.engine.placement import plan_placement, with_cpus
    from pipelines.stage import Resources
    from tests.stages import CountSetup, Slow

    gpu_stage = CountSetup(resources=Resources(cpus=1, gpus=1))
    stages = [PlannedStage("model", gpu_stage), PlannedStage("light", Slow(resources=Resources(cpus=1)))]
    cpu_only = plan_placement(stages, cluster_cpus=2, has_gpu=False)
    assert cpu_only.cpus == {"model": 2}
    assert cpu_only.cpu_scale == pytest.approx(2 / 4)  # actors of 2 and 1 CPUs + 1 task CPU on 2 CPUs
    assert cpu_only.pools == {"model": (1, 1), "light": (1, 1)}
    with_gpu = plan_placement(stages, cluster_cpus=2, has_gpu=True)
    assert with_gpu.cpus == {} and with_gpu.cpu_scale == pytest.approx(2 / 3)
    granted = with_cpus(stages[0], 2)
    assert granted.stage.resources == Resources(cpus=2, gpus=1)
    assert gpu_stage.resources.cpus == 1  # the configured stage is left as it was


def test_global_state_is_not_shipped_to_workers_but_loaded_from_the_run(tmp_path):
    import pickle

    from curation.dedup import ExactDuplicates
    from pipelines.engine.chain import PlannedStage
    from pipelines.engine.rundir import RunDir

    rundir = RunDir(str(tmp_path / "run"))
    state = {"duplicate_of": {i: "x" for i in range(10_000)}, "groups": 1, "largest": 2}
    rundir.save_aggregate("exact_duplicates", state)
    planned = PlannedStage("exact_duplicates", ExactDuplicates(), state=state, state_source=rundir)
    shipped = pickle.loads(pickle.dumps(planned))
    assert shipped.state is None and len(pickle.dumps(planned)) < 2_000
    shipped.setup()
    assert shipped.state == state


def test_ray_steps_are_named_after_their_stages(ray_session):
    """Operators, actor classes and so worker process titles say which stage they run
    (``ray::MapWorker(MapBatches(count_setup)).submit``): what an operator, or a test, needs to find
    the worker of a stage."""
    import ray.data

    from curation.basic import CaptionLength
    from pipelines.engine.chain import PlannedStage
    from pipelines.engine.placement import Placement
    from pipelines.engine.runner import map_stage
    from pipelines.engine.shard_codec import apply_stage_batch
    from tests.stages import CountSetup

    stages = [PlannedStage("caption_length", CaptionLength()), PlannedStage("count_setup", CountSetup())]
    placement = Placement(False, 1.0, {"count_setup": (1, 1)})
    ds = ray.data.from_items([{"shard": 0}])
    for planned in stages:
        ds = map_stage(ds, planned, apply_stage_batch, placement, label=planned.name)
    plan = repr(ds)
    assert plan.index("MapBatches(count_setup)") < plan.index("MapBatches(caption_length)")


@dataclass
class LeaveTemporary(Stage):
    """Leaves a temporary file in ``folder`` of the run, as a worker killed in the middle of a write does."""

    name: ClassVar[str] = "leave_temporary"
    folder: str = ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / ".00000.parquet.tmp-0123456789ab").write_bytes(b"half a shard")
        return batch.select([])


def test_a_completed_run_holds_no_temporary_file_of_a_worker_that_died_mid_write(tmp_path, pool):
    from pipelines.engine.runner import LocalRunner

    folder = tmp_path / "runs" / "temporaries" / "01_leave_temporary"
    stages = [{"stage": "tests.pipelines.engine.test_runner:LeaveTemporary", "folder": str(folder)}]
    plan, manifest = run_pipeline_dict(_config(tmp_path, pool, "temporaries", stages, shard_size=5000), LocalRunner())
    assert manifest.status == "complete"
    assert not [p.name for p in Path(plan.run_uri).rglob("*") if ".tmp-" in p.name]


_START_LOCAL_RAY = """
import ray
from pipelines.engine.config import RayConfig
from pipelines.engine.runner import RayRunner
runner = RayRunner(RayConfig(num_cpus=1, object_store_memory=80 * 1024 * 1024))
runner.start()
print("CPUs", ray.cluster_resources()["CPU"])
runner.close()
"""


def test_a_ray_runner_without_address_starts_its_own_ray_despite_a_stale_cluster_address_file():
    """Ray would join the last cluster started on the machine (``ray_current_cluster`` outlives a
    crash) and refuse ``num_cpus`` there; the runner starts a new local Ray instead."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from tests.conftest import REPO_ROOT

    temp_dir = tempfile.mkdtemp(prefix="vlmc-stale-", dir="/tmp")  # short: Ray's socket paths
    try:
        (Path(temp_dir) / "ray").mkdir()
        (Path(temp_dir) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nobody listens
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp_dir}
        done = subprocess.run(
            [sys.executable, "-c", _START_LOCAL_RAY],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CPUs 1.0" in done.stdout


def test_the_cluster_to_join_is_the_configured_address_else_ray_address_from_the_environment(monkeypatch):
    from pipelines.engine.config import RayConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert RayConfig().cluster_address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it for the job
    assert RayConfig().cluster_address == "10.0.0.1:6379"
    assert RayConfig(address="auto").cluster_address == "auto"
