"""Ray Train path of the trainers: the same recipe on several workers (CPU processes or GPUs, one or
many nodes) through ``ray.train.torch.TorchTrainer``.

Each worker reads every ``num_workers``-th shard, the loss sees the features of all workers
(open_clip's gathered ClipLoss) and gradients are averaged, as under DDP; rank 0 writes logs
and checkpoints to ``output_dir``, which must be storage all nodes share, and every worker
resumes from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _clip_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from models.training.clip_recipe import ClipTrainConfig, train_clip

    context = ray.train.get_context()
    train_clip(ClipTrainConfig.model_validate(config), rank=context.get_world_rank(),
               world_size=context.get_world_size(), device=ray.train.torch.get_device())


def train_clip_distributed(config: Any, *, num_workers: int, use_gpu: bool = False,
                           cpus_per_worker: float = 1.0, address: str | None = None) -> dict[str, Any]:
    """Train ``config`` (a ``ClipTrainConfig``) on ``num_workers`` Ray Train workers; the last
    step's metrics (rank 0's line of ``metrics.jsonl``).

    Connects to ``address`` (or the running Ray, or starts a local one sized to the workers).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(1, int(num_workers * cpus_per_worker)), include_dashboard=False)
    storage = Path(config.output_dir).resolve() / "ray_train"
    os.makedirs(storage, exist_ok=True)
    trainer = TorchTrainer(
        _clip_worker,
        train_loop_config=config.model_dump(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name="clip", storage_path=str(storage)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"distributed training failed: {result.error}") from result.error
    log = Path(config.output_dir) / "metrics.jsonl"
    return json.loads(log.read_text().splitlines()[-1]) if log.exists() else {}
