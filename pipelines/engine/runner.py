"""Runners execute phases shard by shard; this is the only module that imports Ray.

``LocalRunner`` runs everything in the calling process (unit tests, debugging, small pools).
``RayRunner`` runs each phase as a Ray Data pipeline whose rows are shards: one ``map_batches``
per stage, class-based actor pools for stages with ``setup`` (models load once per actor),
stateless tasks otherwise, so Ray's streaming executor overlaps stages and applies
backpressure. Inside a shard both runners call the same code (:mod:`pipelines.engine.chain`), so they
produce identical rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from pipelines.engine.chain import PlannedStage, apply_stage
from pipelines.engine.config import RayConfig
from pipelines.engine.keyed import (
    KeyedReduce,
    ReduceInput,
    count_file,
    count_files,
    empty_counts,
    prepare_rows,
    reduce_partition,
    sorted_by_key,
    summed_counts,
)
from pipelines.engine.phase import PhaseTask
from pipelines.engine.placement import Placement, gpu_on_cpu, plan_placement, with_cpus
from pipelines.engine.shard_codec import apply_stage_batch, finish_shards, load_shards
from pipelines.stage import COUNT, KEY
from schemas.manifest import ShardEntry

log = logging.getLogger(__name__)

#: Largest actor pool per stage on an autoscaling cluster when the stage sets no concurrency.
AUTOSCALE_MAX_ACTORS = 64


#: Most partitions of a keyed reduction's hash shuffle (one per input shard below it).
MAX_KEY_PARTITIONS = 1024

#: Most partitions of a sum by key (Ray Data's default of 200 is for keys that grow with the pool).
MAX_SUM_PARTITIONS = 16

#: How often a crashed worker is restarted, or a failed task retried, before the phase fails.
#: Finite on purpose: a stage that kills its worker on some input must fail the run, not loop.
WORKER_RETRIES = 3

#: How long a local Ray keeps an idle worker process before killing it.
IDLE_WORKER_KEEP_MS = 600_000


class Runner(ABC):
    """Executes phases over shards, and the passes over the whole pool that global stages need
    (sums by key, keyed reductions, tasks)."""

    @abstractmethod
    def run_phase(self, task: PhaseTask, shards: list[int]) -> Iterator[ShardEntry]:
        """Process and write each shard; yield its ledger entry as soon as it is written."""

    @abstractmethod
    def map_tasks(self, fn: Callable[..., Any], first: Any, items: list[Any]) -> Iterator[Any]:
        """``fn(first, item)`` for each item, in parallel where the runner can: each result as it
        comes, in any order."""

    @abstractmethod
    def sum_by_key(self, source: ReduceInput, counts: Callable[[pa.Table], pa.Table]) -> pa.Table:
        """``counts`` of every table of ``source`` (rows of ``KEY`` and ``COUNT``), summed by key."""

    @abstractmethod
    def run_task(self, fn: Callable[[Any], Any], arg: Any, memory: int) -> Any:
        """``fn(arg)`` in one task that may hold ``memory`` bytes; its result."""

    @abstractmethod
    def reduce_by_key(self, job: KeyedReduce) -> list[dict[str, Any]]:
        """Run a keyed reduction (see :mod:`pipelines.engine.keyed`); the facts of its reductions."""

    def close(self) -> None:
        """Release what the runner started."""


class LocalRunner(Runner):
    """Runs every shard in this process, one after the other."""

    def __init__(self) -> None:
        self._ready: dict[int, PlannedStage] = {}

    def _setup(self, planned: PlannedStage) -> PlannedStage:
        """The stage as it runs here, set up once. Stages run one after the other in this
        process, so a model stage gets every core (with a GPU its threads hardly matter)."""
        if id(planned) not in self._ready:
            ready = planned
            if planned.stage.resources.gpus:
                ready = with_cpus(planned, max(planned.stage.resources.cpus, os.cpu_count() or 1))
                import torch

                if not torch.cuda.is_available():
                    log.warning(
                        gpu_on_cpu(
                            planned.name, planned.stage.resources.gpus, "this machine", ready.stage.resources.cpus
                        )
                    )
            ready.setup()
            self._ready[id(planned)] = ready
        return self._ready[id(planned)]

    def run_phase(self, task: PhaseTask, shards: list[int]) -> Iterator[ShardEntry]:
        stages = [self._setup(planned) for planned in task.stages] if shards else []
        for shard in shards:
            state = task.io.load(shard)
            for planned in stages:
                state = apply_stage(planned, state)
            yield task.io.finish(state)

    def map_tasks(self, fn, first, items):
        for item in items:
            yield fn(first, item)

    def sum_by_key(self, source, counts):
        tables = [count_file(source, path, counts) for path in source.paths]
        return summed_counts(pa.concat_tables(tables) if tables else empty_counts())

    def run_task(self, fn, arg, memory):
        return fn(arg)

    def reduce_by_key(self, job):
        tables = [
            job.prepare(source.files().read_table(path, list(source.columns)), source)
            for source in job.inputs
            for path in source.paths
        ]
        if not tables:
            return []
        return [job.reduce_and_write(sorted_by_key(pa.concat_tables(tables, promote_options="default"), job.key))]


class RayRunner(Runner):
    """Runs phases as Ray Data pipelines on a local Ray or on the cluster at ``address``.

    On a Ray it starts itself (or one already running in this process) the cluster is fixed, so
    actor pools are sized to fit it, leaving room for the read and write tasks. Connected to a
    cluster by ``address``, it leaves sizing and GPU placement to Ray's autoscaler.
    """

    def __init__(self, config: RayConfig | None = None) -> None:
        self.config = config or RayConfig()
        self._started_ray = False
        self._deaths: WorkerDeaths | None = None

    def start(self) -> None:
        """Start (or join) Ray as configured, unless this process has one; watch its workers from now."""
        import ray

        if not ray.is_initialized():
            self._init()
        if self._deaths is None:
            self._deaths = WorkerDeaths()

    def _init(self) -> None:
        import ray

        common = dict(include_dashboard=False, log_to_driver=self.config.log_to_driver, configure_logging=False)
        if address := self.config.cluster_address:
            ray.init(address=address, **common)
        else:
            # Workers inherit the driver's environment: make stage modules beside the user importable.
            paths = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
            # "local": never the last cluster started here (see RayConfig). Ray kills idle workers
            # beyond num_cpus after 1 s, so each shard's short write task would start (and import
            # the project in) a fresh process on the cores a model actor uses; keep them instead.
            ray.init(
                address="local",
                num_cpus=self.config.num_cpus,
                num_gpus=self.config.num_gpus,
                object_store_memory=self.config.object_store_memory,
                _temp_dir=self.config.temp_dir,
                _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
                **common,
            )
        self._started_ray = True
        log.info("started Ray: %s", ray.cluster_resources())

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False
        self._deaths = None

    def _data_context(self):
        import ray.data

        self.start()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws one bar per phase
        context.print_on_execution_start = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        return context

    def _placement(self, stages: list[PlannedStage]) -> Placement:
        import ray

        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 0)
        node_cpus = min((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0, key=_or_inf)
        fixed = plan_placement(stages, cpus or 1, resources.get("GPU", 0) > 0, resources.get("memory"), node_cpus)
        # A cluster joined by address may autoscale: ask, and let Ray provide; unless what it has
        # now cannot hold one actor of each stage and a task on a node, which would hang a
        # cluster that does not grow.
        if self.config.cluster_address and (not cpus or fixed.cpu_scale == 1.0):
            return Placement(
                True,
                1.0,
                {p.name: (1, p.stage.resources.concurrency or AUTOSCALE_MAX_ACTORS) for p in stages if p.stateful},
            )
        return fixed

    def run_phase(self, task: PhaseTask, shards: list[int]) -> Iterator[ShardEntry]:
        if not shards:
            return
        import ray.data

        self._data_context()
        placement = self._placement(task.stages)
        io_args = dict(
            fn_kwargs={"io": task.io},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=placement.cpu_scale,
            max_retries=WORKER_RETRIES,
        )
        ds = ray.data.from_items([{"shard": shard} for shard in shards], override_num_blocks=len(shards))
        ds = _map_batches(ds, load_shards, **io_args)
        for planned in task.stages:
            ds = map_stage(ds, planned, apply_stage_batch, placement, label=planned.name)
        ds = _map_batches(ds, finish_shards, **io_args)
        for row in ds.iter_rows():
            yield ShardEntry.from_json(row["entry"])
        self._deaths.report(f"phase {task.io.name}")

    def map_tasks(self, fn, first, items):
        if not items:
            return
        import ray

        self.start()
        remote = ray.remote(max_retries=WORKER_RETRIES)(fn)
        first_ref = ray.put(first)
        pending = [remote.remote(first_ref, item) for item in items]
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            yield ray.get(finished[0])
        self._deaths.report(fn.__name__)

    def sum_by_key(self, source, counts):
        if not source.paths:
            return empty_counts()

        import ray.data

        self._data_context()
        # A task per file, so that a stage counts whole shards (as under the local runner), never
        # blocks that Ray Data cut or merged: a count drawn from a shard's rows stays the same.
        paths = ray.data.from_items([{"path": path} for path in source.paths], override_num_blocks=len(source.paths))
        ds = _map_batches(
            paths,
            count_files,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"counts": counts, "source": source},
            max_retries=WORKER_RETRIES,
        )
        # The keys of a pass are few (bounded by the stage, not the pool): a few partitions do.
        partitions = min(len(source.paths), MAX_SUM_PARTITIONS)
        summed = ds.groupby(KEY, num_partitions=partitions).sum(COUNT).iter_batches(batch_format="pyarrow")
        totals = [t.rename_columns([KEY, COUNT]) for t in summed if t.num_rows]  # Ray names it sum(count)
        self._deaths.report("a sum by key")
        return summed_counts(pa.concat_tables(totals) if totals else empty_counts())

    def run_task(self, fn, arg, memory):
        import ray

        self.start()
        # Never more than the largest node has, or Ray would wait for one forever.
        largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
        options: dict[str, Any] = {"max_retries": WORKER_RETRIES}
        if min(memory, largest) >= 1:
            options["memory"] = int(min(memory, largest))
        result = ray.get(ray.remote(**options)(_call).remote(fn, arg))
        self._deaths.report(getattr(fn, "__name__", "a task"))
        return result

    def reduce_by_key(self, job):
        sources = [source for source in job.inputs if source.paths]
        if not sources:
            return []

        self._data_context()
        parts = [
            _map_batches(
                _read(source),
                prepare_rows,
                batch_format="pyarrow",
                fn_kwargs={"job": job, "source": source},
                max_retries=WORKER_RETRIES,
            )
            for source in sources
        ]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # A hash shuffle: each output block holds every row of its keys, sorted by key.
        files = sum(len(source.paths) for source in sources)
        ds = ds.repartition(min(files, MAX_KEY_PARTITIONS), keys=[job.key], sort=True)
        ds = _map_batches(
            ds,
            reduce_partition,
            batch_size=None,  # the whole block: a group of keys is never split
            batch_format="pyarrow",
            fn_kwargs={"job": job},
            max_retries=WORKER_RETRIES,
        )
        facts = [json.loads(row["facts"]) for row in ds.iter_rows()]
        self._deaths.report(f"the reduction into {job.out}")
        return facts


def make_runner(kind: str, ray_config: RayConfig | None = None) -> Runner:
    if kind == "local":
        return LocalRunner()
    if kind == "ray":
        return RayRunner(ray_config)
    raise ValueError(f"runner {kind!r} is not one of: local, ray")


# Ray Data map functions. A row is a shard (pipelines.engine.shard_codec).


class _StageActor:
    """Holds one stage in a Ray actor: ``setup`` runs once when the actor starts."""

    def __init__(self, planned: PlannedStage, fn, **kwargs) -> None:
        self.planned, self.fn, self.kwargs = planned, fn, kwargs
        planned.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(batch, self.planned, **self.kwargs)


def _read(source: ReduceInput):
    """The ``columns`` of a reduction's input files as a Ray dataset."""
    import ray.data

    return ray.data.read_parquet(list(source.paths), filesystem=source.files().fs).select_columns(list(source.columns))


def _or_inf(cpus: float) -> float:
    """Nodes without CPUs (a head that only drives) never hold a task: they do not count."""
    return cpus or float("inf")


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    return fn(arg)


def _map_batches(ds, fn, **args):
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_restarts/max_retries as keyword arguments but offers
        # no named parameter for them yet; without them a crashing worker is retried forever.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return ds.map_batches(fn, **args)


def map_stage(ds, planned: PlannedStage, fn, placement: Placement, label: str, **kwargs):
    """``ds.map_batches`` running ``fn(batch, planned, **kwargs)`` with the stage's resources.

    The step is named ``label`` (Ray Data names an operator after its function or class), so the
    stage shows in Ray's operator names, logs, dashboard and worker process titles, e.g.
    ``ray::MapWorker(MapBatches(clip_embed)).submit`` for an actor running a ``clip_embed`` batch.
    """
    import ray.data

    if planned.name in placement.cpus:
        planned = with_cpus(planned, placement.cpus[planned.name])
    resources = planned.stage.resources
    pool = placement.pools.get(planned.name)
    gpus = resources.gpus
    if gpus and not placement.has_gpu:
        log.warning(gpu_on_cpu(planned.name, gpus, "this Ray cluster", resources.cpus))
        gpus = 0
    args: dict[str, Any] = dict(batch_size=1, batch_format="pyarrow", num_cpus=resources.cpus * placement.cpu_scale)
    if gpus:
        args["num_gpus"] = gpus
    if resources.memory:
        args["memory"] = int(resources.memory * placement.memory_scale)
    env = planned.stage.worker_env()
    if env:
        args["runtime_env"] = {"env_vars": env}
    if pool is not None:
        low, high = pool
        strategy = (
            ray.data.ActorPoolStrategy(size=low)
            if low == high
            else ray.data.ActorPoolStrategy(min_size=low, max_size=high)
        )
        args.update(
            compute=strategy,
            fn_constructor_args=(planned, fn),
            fn_constructor_kwargs=kwargs,
            max_restarts=WORKER_RETRIES,
            max_task_retries=WORKER_RETRIES,
        )
        target = type(label, (_StageActor,), {"__module__": __name__, "__qualname__": label})
    else:
        if resources.concurrency is not None:
            args["compute"] = ray.data.TaskPoolStrategy(size=resources.concurrency)
        args.update(fn_kwargs={"planned": planned, **kwargs}, max_retries=WORKER_RETRIES)
        target = _named_task(fn, label)
    return _map_batches(ds, target, **args)


def _named_task(fn, label: str):
    """``fn`` under the name ``label`` (pickled by value, like the named actor classes)."""

    def task(batch: pa.Table, **kwargs) -> pa.Table:
        return fn(batch, **kwargs)

    task.__name__ = task.__qualname__ = label
    return task


class WorkerDeaths:
    """Watches this job's Ray workers: one that died unexpectedly (crashed, killed, out of memory)
    had its actor restarted or its task retried by Ray. The run goes on with every row, but the
    user hears of it, with the stages whose actors were restarted.

    It reads Ray's own worker and actor tables (GCS) through ``ray._private.state``: Ray's state
    API (``ray.util.state``) would need the dashboard, which this runner does not start.
    """

    UNEXPECTED = ("SYSTEM_ERROR", "NODE_OUT_OF_MEMORY")

    def __init__(self) -> None:
        self.seen, self.restarts = self._deaths(), self._restarts()

    def report(self, during: str) -> None:
        deaths, restarts = self._deaths(), self._restarts()
        new = [why for worker, why in deaths.items() if worker not in self.seen]
        restarted = sorted(name for name, n in restarts.items() if n > self.restarts.get(name, 0))
        self.seen, self.restarts = deaths, restarts
        if new:
            log.warning(
                "%d Ray worker(s) died during %s and Ray ran their work again%s (%s); no row is lost, "
                "but a stage whose workers keep dying fails the run after %d retries",
                len(new),
                during,
                f", restarting the actors of {', '.join(restarted)}" if restarted else "",
                "; ".join(sorted(set(new))),
                WORKER_RETRIES,
            )

    @classmethod
    def _deaths(cls) -> dict[str, str]:
        """Workers of this job that exited unexpectedly: their exit type and detail, by worker id."""
        import ray
        from ray._private.state import state
        from ray.core.generated import common_pb2, gcs_pb2

        job = ray.get_runtime_context().get_job_id()
        deaths = {}
        for raw in state._connect_and_get_accessor().get_worker_table():
            worker = gcs_pb2.WorkerTableData.FromString(raw)
            exit_type = common_pb2.WorkerExitType.Name(worker.exit_type)
            if not worker.is_alive and worker.job_id.hex() == job and exit_type in cls.UNEXPECTED:
                detail = worker.exit_detail.split(". ")[0][:200]
                deaths[worker.worker_address.worker_id.hex()] = f"{exit_type}: {detail}"
        return deaths

    @staticmethod
    def _restarts() -> dict[str, int]:
        """Restarts of this job's actors, by stage (Ray Data names an actor after its operator)."""
        import ray
        from ray._private.state import actors

        counts: dict[str, int] = {}
        for actor in actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id())).values():
            match = re.search(r"MapBatches\((.+)\)\)$", actor["ActorClassName"])
            name = match.group(1) if match else actor["ActorClassName"]
            counts[name] = counts.get(name, 0) + actor["NumRestarts"]
        return counts
