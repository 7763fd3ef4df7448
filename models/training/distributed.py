"""Ray Train path of the trainers (CLIP and the VLM): the same recipe on several workers (CPU processes or GPUs, one or
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

#: Recipes the Ray Train path runs: name -> (config class path, train function path).
RECIPES = {
    "clip": ("models.training.clip_recipe", "ClipTrainConfig", "train_clip"),
    "vlm": ("models.training.llava_recipe", "VlmTrainConfig", "train_vlm"),
}


def load_recipe(name: str) -> tuple[Any, Any]:
    import importlib

    module, config_class, train = RECIPES[name]
    loaded = importlib.import_module(module)
    return getattr(loaded, config_class), getattr(loaded, train)


def _worker(payload: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config_class, train = load_recipe(payload["recipe"])
    context = ray.train.get_context()
    train(
        config_class.model_validate(payload["config"]),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
    )


def train_distributed(
    recipe: str,
    config: Any,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
) -> dict[str, Any]:
    """Train ``config`` (the recipe's config, e.g. a ``ClipTrainConfig``) on ``num_workers`` Ray Train
    workers; the last step's metrics (rank 0's line of ``metrics.jsonl``).

    Connects to ``address`` (or the running Ray, or starts a local one sized to the workers).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; one of {sorted(RECIPES)}")
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
        _worker,
        train_loop_config={"recipe": recipe, "config": config.model_dump()},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(name=recipe, storage_path=str(storage)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"distributed training failed: {result.error}") from result.error
    log = Path(config.output_dir) / "metrics.jsonl"
    return json.loads(log.read_text().splitlines()[-1]) if log.exists() else {}
