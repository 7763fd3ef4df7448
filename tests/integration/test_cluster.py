"""Running on a Ray cluster: the launcher config, and a pipeline submitted as a Ray job.

The job test starts a real two-node cluster on this machine (``ray start --head`` with the
dashboard and its job server, then ``ray start --address`` for a second node; one CPU each, small
object stores, their own temp dir and ports), submits ``vlmcurate run`` to it the way the README
says (``ray job submit --working-dir . -- vlmcurate run ...``), and checks that the job's kept
rows, rejects and ledger equal those of a local run on the same input, and that both nodes ran
its tasks. The config is the text pool's followed by every kind of whole-pool decision (exact
and caption near-duplicates, MetaCLIP balancing, the null-calibrated and top-fraction CLIP
cuts), so each is shown to decide the same on two nodes as in one process. The cluster is stopped through the ``ray start --block`` processes this test started
(never a global ``ray stop``: other Rays run on this machine).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.demo.pool import write_demo_pool
from pipelines.demo.scenes import COLORS, SHAPES
from pipelines.engine.config import load_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.runner import LocalRunner
from pipelines.job import build_plan
from tests.conftest import REPO_ROOT, TEXT_ONLY_HOST, free_port, read_phase, read_rejects

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
OBJECT_STORE = 100 * 1024 * 1024


# The launcher config ------------------------------------------------------------------------------


def _launcher_config() -> dict:
    with open(REPO_ROOT / "ray_cluster.yaml") as f:
        return yaml.safe_load(f)


def test_ray_cluster_yaml_is_a_valid_launcher_config():
    """What `ray up` does first: fill in the provider's defaults, then check Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _launcher_config()
    config = prepare_config(raw)
    validate_config(config)  # raises on a key the schema does not know, a missing one or a wrong type
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["gpus"] = 1  # not a launcher key: the check is real
    with pytest.raises(jsonschema.ValidationError, match="'gpus' was unexpected"):
        validate_config(prepare_config(broken))

    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}  # the driver only: no task competes with it
    assert types["head"]["max_workers"] == 0
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1
    assert config["max_workers"] >= types["cpu_worker"]["max_workers"] + types["gpu_worker"]["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    # Every node installs the project from the synced copy, CPU and GPU nodes with their faiss extra
    # (the two extras overwrite each other, never both); the head also gets the AWS SDK its autoscaler needs.
    assert config["file_mounts"] == {"~/vlmcurate": "."}
    head_setup = " ".join(raw["head_setup_commands"])
    assert "'.[cpu]'" in head_setup and "boto3" in head_setup
    assert "'.[cpu]'" in " ".join(types["cpu_worker"]["worker_setup_commands"])
    gpu_setup = " ".join(types["gpu_worker"]["worker_setup_commands"])
    assert "'.[gpu]'" in gpu_setup and "[cpu]" not in gpu_setup
    # Ray is started from the project's environment, so the cluster runs the Ray version it pins.
    assert any("venv" in c for c in config["setup_commands"])
    assert any(
        "ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
        for c in config["head_start_ray_commands"]
    )
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert (REPO_ROOT / "pyproject.toml").read_text().count('"ray[default,data]==') == 1  # the job server


# A two-node cluster on this machine -----------------------------------------------------------------


class LocalCluster:
    """A head (with the dashboard and job server) and one more node, each a ``ray start --block``."""

    def __init__(self) -> None:
        # Short: Ray's unix socket paths live under it and must stay below 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="vlmc-cl-", dir="/tmp")
        self.marker = f"VLMC_TEST_CLUSTER={self.temp_dir}"
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.processes: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        # The job's entrypoint (`vlmcurate`) must be on the nodes' PATH, as a venv's bin is on a real cluster.
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            VLMC_TEST_CLUSTER=self.temp_dir,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="disabled",
            # A SIGTERMed node otherwise drains for up to 30 s before it stops its processes.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        self.env = env

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        common = [
            "--block",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE}",
            f"--temp-dir={self.temp_dir}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            "--include-log-monitor=false",  # job logs come from the job server
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        log = open(Path(self.temp_dir, f"{name}.log"), "w")
        self.processes.append(
            subprocess.Popen(
                [RAY, "start", *args, *common],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(self.temp_dir).glob("*.log")))

    def start(self, timeout: float = 90) -> list:
        from ray.util.state import list_nodes

        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ],
        )
        self._start("node", [f"--address=127.0.0.1:{self.gcs_port}"])
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                assert process.poll() is None, "a `ray start` exited:\n" + self.logs()
            try:
                nodes = [n for n in list_nodes(address=self.dashboard, timeout=5) if n.state == "ALIVE"]
            except Exception:  # the dashboard is not up yet
                nodes = []
            if len(nodes) == 2:
                return nodes
            assert time.monotonic() < deadline, "the cluster did not come up:\n" + self.logs()
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM each ``ray start --block`` (it stops its node's processes), worker node first; then
        SIGKILL whatever process of this cluster is left (found by the marker in its environment)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (left := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _leftovers(self) -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.marker.encode() in environ and int(pid) != os.getpid():
                found.append(int(pid))
        return found


def _job_nodes(dashboard: str, job_id: str, timeout: float = 20) -> set[str]:
    """The nodes that ran the job's tasks and actor methods (task events reach the GCS within ~1 s)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while True:
        tasks = list_tasks(
            address=dashboard,
            filters=[("job_id", "=", job_id)],
            detail=True,
            limit=10_000,
            raise_on_missing_output=False,
        )
        nodes = {t.node_id for t in tasks if t.node_id and t.type in ("NORMAL_TASK", "ACTOR_TASK")}
        if len(nodes) >= 2 or time.monotonic() > deadline:
            return nodes
        time.sleep(1)


#: The whole-pool decisions whose kept rows must not depend on the runner or the nodes.
GLOBAL_STAGES = [
    {"stage": "tests.stages:EmbedPairs"},
    {"stage": "curation.metaclip:MetaclipMatch", "metadata": None},  # the test's metadata file
    {"stage": "curation.metaclip:MetaclipBalance", "threshold": 60, "tail_share": None},
    {"stage": "curation.dedup:CaptionNearDuplicates", "threshold": 0.9, "keep": "longest_caption"},
    {"stage": "curation.clip_score_null:ClipScoreNullCut"},
    {"stage": "curation.clip_score:ClipScoreTopFraction", "fraction": 0.8},
]


def _config(tmp_path: Path) -> Path:
    """configs/text-pool.yaml followed by every kind of whole-pool decision: MetaCLIP balancing
    (a sum by key), caption near-duplicates (a keyed reduction into edges, clustered in a task), the
    null-calibrated cut (whole shards counted) and the top fraction (counting passes)."""
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps(list(SHAPES) + list(COLORS)))
    with open(REPO_ROOT / "configs" / "text-pool.yaml") as f:
        config = yaml.safe_load(f)
    stages = copy.deepcopy(GLOBAL_STAGES)
    stages[1]["metadata"] = str(metadata)
    config["stages"] += stages
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _local_run(config: Path, pool: Path, output: Path):
    """The config on the pool with the local runner, in this process."""
    overrides = [f"input={pool}", f"output_dir={output}", "shard_size=400", "runner=local"]
    plan = build_plan(load_config(config, overrides))
    return plan, run_pipeline(plan, LocalRunner())


@pytest.mark.timeout(300)
def test_a_pipeline_submitted_as_a_ray_job_to_a_two_node_cluster_keeps_the_rows_of_a_local_run(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    pool = tmp_path / "pool.csv"
    lines = write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=1200, seed=5)
    config = _config(tmp_path)
    local_plan, local = _local_run(config, pool, tmp_path / "local")
    totals = local.stage_totals()
    for stage in ("metaclip_balance", "caption_near_duplicates", "clip_score_null_cut", "clip_score_top_fraction"):
        assert sum(totals[stage].rejected.values()) > 0, f"{stage} decided nothing on this pool"

    cluster = LocalCluster()
    try:
        nodes = cluster.start()
        submission = os.path.basename(cluster.temp_dir)  # unique: vlmc-cl-<random>
        # The README's command, verbatim but for the addresses. The run directory is a file:// URI, as
        # an s3:// one would be on a real cluster; the input is read by the driver (on the head).
        command = [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--submission-id",
            submission,
            "--working-dir",
            ".",
            "--",
            "vlmcurate",
            "run",
            str(config),
            f"input={pool}",
            f"output_dir=file://{tmp_path / 'job'}",
            "shard_size=400",
            "runner=ray",
            "ray.address=auto",
        ]
        done = subprocess.run(command, cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True, timeout=240)
        client = JobSubmissionClient(cluster.dashboard)
        info = client.get_job_info(submission)
        assert done.returncode == 0 and info.status == JobStatus.SUCCEEDED, (
            f"{info.status}: {info.message}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        )
        assert "kept rows:" in client.get_job_logs(submission)
        ran_on = _job_nodes(cluster.dashboard, info.job_id)
        assert ran_on == {n.node_id for n in nodes}, "the job's work did not spread over both nodes"
    finally:
        cluster.stop()

    job_run = tmp_path / "job" / "text-pool"
    manifest = json.loads((job_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config_hash"] == local.config_hash
    assert manifest["ledger"]["read"]["rows_in"] == lines
    final = local.final_phase
    assert manifest["phases"][-1]["name"] == final
    kept, expected = read_phase(job_run, final), read_phase(local_plan.run_uri, final)
    assert 0 < kept.num_rows < lines
    assert kept.equals(expected)
    assert read_rejects(job_run).equals(read_rejects(local_plan.run_uri))
    assert manifest["ledger"] == json.loads(local.to_json())["ledger"]
