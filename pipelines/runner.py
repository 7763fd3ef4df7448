"""Runners execute phases shard by shard; this is the only module that imports Ray.

``LocalRunner`` runs everything in the calling process (unit tests, debugging, small pools).
``RayRunner`` runs each phase as a Ray Data pipeline whose rows are shards: one ``map_batches``
per stage, class-based actor pools for stages with ``setup`` (models load once per actor),
stateless tasks otherwise, so Ray's streaming executor overlaps stages and applies
backpressure. Inside a shard both runners call the same code (:mod:`pipelines.chain`), so they
produce identical rows.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipelines.chain import PlannedStage, ShardState, apply_stage
from pipelines.config import RayConfig
from pipelines.phase import PhaseTask, compute_partial
from pipelines.rundir import RunDir
from schemas.manifest import ShardEntry, StageCounts

log = logging.getLogger(__name__)


class Runner(ABC):
    """Executes phases over shards and the ``compute`` pass of global stages."""

    @abstractmethod
    def run_phase(self, task: PhaseTask, shards: list[int]) -> Iterator[ShardEntry]:
        """Process and write each shard; yield its ledger entry as soon as it is written."""

    @abstractmethod
    def compute_partials(self, planned: PlannedStage, rundir: RunDir, phase: str, shards: list[int]) -> list[Any]:
        """``planned.stage.compute`` on each finished shard of ``phase``, in the order of ``shards``."""

    def close(self) -> None:
        """Release what the runner started."""


class LocalRunner(Runner):
    """Runs every shard in this process, one after the other."""

    def __init__(self) -> None:
        self._ready: set[int] = set()

    def _setup(self, planned: PlannedStage) -> None:
        if id(planned) not in self._ready:
            planned.setup()
            self._ready.add(id(planned))

    def run_phase(self, task: PhaseTask, shards: list[int]) -> Iterator[ShardEntry]:
        if shards:
            for planned in task.stages:
                self._setup(planned)
        for shard in shards:
            state = task.load(shard)
            for planned in task.stages:
                state = apply_stage(planned, state)
            yield task.finish(state)

    def compute_partials(self, planned, rundir, phase, shards):
        return [compute_partial(planned, rundir, phase, shard) for shard in shards]


class RayRunner(Runner):
    """Runs phases as Ray Data pipelines on a local Ray or on the cluster at ``address``."""

    def __init__(self, config: RayConfig | None = None) -> None:
        self.config = config or RayConfig()
        self._started_ray = False

    def _ensure_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if self.config.address:
            ray.init(address=self.config.address, **common)
        else:
            ray.init(num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus,
                     object_store_memory=self.config.object_store_memory,
                     _temp_dir=self.config.temp_dir, **common)
        self._started_ray = True
        log.info("started Ray: %s", ray.cluster_resources())
        # Ray Data's own progress bars are off (the CLI draws one per phase); silence its notice.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def run_phase(self, task: PhaseTask, shards: list[int]) -> Iterator[ShardEntry]:
        if not shards:
            return
        import ray
        import ray.data

        self._ensure_ray()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        resources = ray.cluster_resources()
        has_gpu = resources.get("GPU", 0) > 0
        pools = plan_actor_pools(task.stages, resources.get("CPU", 1))

        items = [{"shard": shard} for shard in shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_load_shards, fn_kwargs={"task": task}, batch_size=1, batch_format="pyarrow")
        for planned in task.stages:
            ds = ds.map_batches(**_stage_map_args(planned, has_gpu, pools.get(planned.name)))
        ds = ds.map_batches(_finish_shards, fn_kwargs={"task": task}, batch_size=1, batch_format="pyarrow")
        for row in ds.iter_rows():
            yield ShardEntry.from_json(row["entry"])

    def compute_partials(self, planned, rundir, phase, shards):
        import ray

        self._ensure_ray()
        remote = ray.remote(num_cpus=planned.stage.resources.cpus)(compute_partial)
        planned_ref = ray.put(planned)
        return ray.get([remote.remote(planned_ref, rundir, phase, shard) for shard in shards])


def make_runner(kind: str, ray_config: RayConfig | None = None) -> Runner:
    if kind == "local":
        return LocalRunner()
    if kind == "ray":
        return RayRunner(ray_config)
    raise ValueError(f"runner {kind!r} is not one of: local, ray")


# Ray Data map functions. A row is a shard: its rows and rejects as Arrow IPC, its counts as JSON.

class _StageActor:
    """Holds one stage in a Ray actor; ``setup`` runs once when the actor starts."""

    def __init__(self, planned: PlannedStage) -> None:
        self.planned = planned
        planned.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _encode([apply_stage(self.planned, state) for state in _decode(batch)])


def _apply_stage_batch(batch: pa.Table, planned: PlannedStage) -> pa.Table:
    return _encode([apply_stage(planned, state) for state in _decode(batch)])


def _load_shards(batch: pa.Table, task: PhaseTask) -> pa.Table:
    return _encode([task.load(shard) for shard in batch["shard"].to_pylist()])


def _finish_shards(batch: pa.Table, task: PhaseTask) -> pa.Table:
    entries = [task.finish(state) for state in _decode(batch)]
    return pa.table({"entry": pa.array([e.to_json() for e in entries], pa.string())})


def plan_actor_pools(stages: list[PlannedStage], cluster_cpus: float) -> dict[str, tuple[int, int]]:
    """(min, max) actor-pool sizes for the stages with ``setup``, within the cluster's CPUs.

    Actors hold their CPUs for the whole phase, so if they took every CPU the task-based steps
    (reading, stateless stages, writing) could never be scheduled and the phase would hang.
    One task's worth of CPUs stays free; pools asked to be larger are shrunk with a warning,
    and a phase whose smallest pools cannot fit fails with a message instead of hanging.
    """
    actors = [p for p in stages if p.stage.has_setup]
    reserve = max([1.0] + [p.stage.resources.cpus for p in stages if not p.stage.has_setup])
    budget = cluster_cpus - reserve
    needed = sum(p.stage.resources.cpus for p in actors)
    if actors and needed > budget + 1e-9:
        raise ValueError(
            f"stages {[p.name for p in actors]} run as actors needing {needed:g} CPU(s) at one actor "
            f"each, and {reserve:g} more must stay free for the other steps, but the cluster has "
            f"{cluster_cpus:g}: lower their resources.cpus or add CPUs (ray.num_cpus)"
        )
    pools = {}
    for p in actors:
        cpus = p.stage.resources.cpus
        spare = budget - (needed - cpus)  # what is left for this pool once the others have one actor
        largest = max(1, int((spare + 1e-9) // cpus))
        wanted = p.stage.resources.concurrency
        if wanted is not None and wanted > largest:
            log.warning("stage %r asks for %d actors but only %d fit beside the other steps on %g CPUs",
                        p.name, wanted, largest, cluster_cpus)
        pools[p.name] = (min(wanted, largest), min(wanted, largest)) if wanted else (1, largest)
    return pools


def _stage_map_args(planned: PlannedStage, has_gpu: bool, pool: tuple[int, int] | None) -> dict[str, Any]:
    import ray.data

    resources = planned.stage.resources
    gpus = resources.gpus
    if gpus and not has_gpu:
        log.warning("stage %r asks for %s GPU(s) but the cluster has none: running it on CPUs", planned.name, gpus)
        gpus = 0
    args: dict[str, Any] = dict(batch_size=1, batch_format="pyarrow", num_cpus=resources.cpus)
    if gpus:
        args["num_gpus"] = gpus
    if pool is not None:
        low, high = pool
        strategy = ray.data.ActorPoolStrategy(size=low) if low == high else \
            ray.data.ActorPoolStrategy(min_size=low, max_size=high)
        # Ray Data restarts crashed actors and retries their tasks by default (max_restarts=-1).
        args.update(fn=_StageActor, fn_constructor_args=(planned,), compute=strategy)
    else:
        if resources.concurrency is not None:
            args["compute"] = ray.data.TaskPoolStrategy(size=resources.concurrency)
        args.update(fn=_apply_stage_batch, fn_kwargs={"planned": planned})
    return args


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(scalar: pa.Scalar) -> pa.Table:
    return pa.ipc.open_stream(scalar.as_buffer()).read_all()


def _encode(states: list[ShardState]) -> pa.Table:
    rejects = [s.rejects_table() for s in states]
    return pa.table({
        "shard": pa.array([s.shard for s in states], pa.int64()),
        "rows_in": pa.array([s.rows_in for s in states], pa.int64()),
        "rows": pa.array([_ipc(s.rows) for s in states], pa.large_binary()),
        "rejects": pa.array([None if r is None else _ipc(r) for r in rejects], pa.large_binary()),
        "counts": pa.array([json.dumps({k: c.to_dict() for k, c in s.counts.items()}) for s in states]),
    })


def _decode(batch: pa.Table) -> list[ShardState]:
    states = []
    for i in range(batch.num_rows):
        rejects = batch["rejects"][i]
        counts = json.loads(batch["counts"][i].as_py())
        states.append(ShardState(
            shard=batch["shard"][i].as_py(),
            rows=_from_ipc(batch["rows"][i]),
            rows_in=batch["rows_in"][i].as_py(),
            rejects=[] if not rejects.is_valid else [_from_ipc(rejects)],
            counts={k: StageCounts.from_dict(v) for k, v in counts.items()},
        ))
    return states
