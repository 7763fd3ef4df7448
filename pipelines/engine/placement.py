"""Where a phase's stages run on a Ray cluster: CPUs per task, actor pools, memory requests, GPU fallback.

Pure arithmetic over the stages' declared ``Resources`` and the cluster's size, so it is tested
without Ray; :mod:`pipelines.engine.runner` applies the result.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace

from pipelines.engine.chain import PlannedStage

log = logging.getLogger(__name__)

#: The share of a fixed cluster's memory the memory requests of one phase may take together.
MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class Placement:
    """How a phase's steps are placed: a CPU scale for every request, the actor-pool sizes, and
    the CPUs granted to stages in place of what they declared (before scaling)."""

    has_gpu: bool
    cpu_scale: float
    pools: dict[str, tuple[int, int]]
    cpus: dict[str, float] = field(default_factory=dict)
    memory_scale: float = 1.0


def with_cpus(planned: PlannedStage, cpus: float) -> PlannedStage:
    """A copy of ``planned`` whose stage declares ``cpus`` (what its ``setup`` sizes threads by)."""
    stage = copy.copy(planned.stage)
    stage.resources = replace(stage.resources, cpus=cpus)
    return replace(planned, stage=stage)


def plan_placement(
    stages: list[PlannedStage],
    cluster_cpus: float,
    has_gpu: bool,
    cluster_memory: float | None = None,
    node_cpus: float | None = None,
) -> Placement:
    """Fit a phase on a fixed cluster: actor pools never take the CPUs the tasks need.

    Actors hold their CPUs for the whole phase. If they took every CPU, the task-based steps
    (reading, stateless stages, writing) could never be scheduled and the phase would hang. One
    task's worth of CPUs (the largest task request, at least 1) stays free. When even one actor
    per stateful stage plus that reserve exceeds the cluster (two model stages on a 2-CPU
    laptop), every CPU request of the phase is scaled down by the same factor, with a warning:
    the steps then share cores instead of waiting for each other forever. On a cluster of
    several nodes the same must hold on its smallest node (``node_cpus``): actors placed one per
    node could otherwise leave each node a fraction of a CPU too small for any task.

    A stage that asks for a GPU on a cluster without one runs its model on CPU threads, and is
    then the phase's bottleneck: it is granted the whole node's CPUs (at least what it asked),
    scaled like every other request, so its threads share the cores with the light tasks beside
    it rather than leave all but one idle. To run several smaller CPU actors instead, declare
    ``gpus: 0`` and the ``cpus`` each should have.
    """
    granted = {
        p.name: max(p.stage.resources.cpus, cluster_cpus)
        for p in stages
        if p.stateful and p.stage.resources.gpus and not has_gpu
    }

    def cpus(p: PlannedStage) -> float:
        return granted.get(p.name, p.stage.resources.cpus)

    actors = [p for p in stages if p.stateful]
    reserve = max([1.0] + [cpus(p) for p in stages if not p.stateful])
    needed = sum(cpus(p) for p in actors)
    room = min(cluster_cpus, node_cpus) if node_cpus else cluster_cpus
    scale = min(1.0, room / (needed + reserve)) if actors else 1.0
    if scale < 1.0:
        log.info(
            "stages %s need %g CPU(s) as actors plus %g for the other steps, more than the %g this Ray "
            "has: scaling the phase's CPU requests by %.2f (they share cores)",
            [p.name for p in actors],
            needed,
            reserve,
            cluster_cpus,
            scale,
        )
    budget = cluster_cpus - reserve * scale
    pools = {}
    for p in actors:
        spare = budget - (needed - cpus(p)) * scale  # once the other pools have one actor
        largest = max(1, int((spare + 1e-9) // (cpus(p) * scale)))
        wanted = p.stage.resources.concurrency
        if wanted is not None and wanted > largest:
            log.warning(
                "stage %r asks for %d actors but only %d fit beside the other steps on %g CPUs",
                p.name,
                wanted,
                largest,
                cluster_cpus,
            )
        pools[p.name] = (min(wanted, largest), min(wanted, largest)) if wanted else (1, largest)
    return Placement(has_gpu, scale, pools, granted, _memory_scale(stages, cluster_memory))


def _memory_scale(stages: list[PlannedStage], cluster_memory: float | None) -> float:
    """1, or less where one worker of each stage that declares ``memory`` would not fit in
    :data:`MEMORY_SHARE` of the cluster's memory: then every memory request of the phase shrinks
    by the same factor, as CPU requests do, so the workers start (and share the memory) instead
    of waiting forever."""
    needed = sum(p.stage.resources.memory or 0 for p in stages)
    if not cluster_memory or needed <= MEMORY_SHARE * cluster_memory:
        return 1.0
    scale = MEMORY_SHARE * cluster_memory / needed
    log.info(
        "stages %s declare %.1f GiB of memory, more than %d%% of the %.1f GiB this Ray has: scaling the "
        "phase's memory requests by %.2f",
        [p.name for p in stages if p.stage.resources.memory],
        needed / 2**30,
        MEMORY_SHARE * 100,
        cluster_memory / 2**30,
        scale,
    )
    return scale


def gpu_on_cpu(stage: str, gpus: float, where: str, cpus: float) -> str:
    """The warning for a stage that asks for a GPU and runs on the CPU."""
    return (
        f"stage {stage!r} asks for a GPU (resources.gpus {gpus:g}) but {where} has none: its model runs on "
        f"{cpus:g} CPU core(s), much slower; set stages.{stage}.resources.gpus=0 if that is intended"
    )
