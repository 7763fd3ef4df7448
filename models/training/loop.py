"""The training loop every recipe shares: steps, accumulation, AMP, schedule, logs, checkpoints, resume.

A recipe supplies a :class:`TrainTask` (the model, its trainable parameters, a deterministic
batch stream per epoch and a loss); :class:`TrainLoop` does the rest. A checkpoint holds the
model, optimizer, scheduler, step, data position (epoch and batches consumed in it) and RNG
states, so a resumed run continues exactly where the last checkpoint left it. One line per
step goes to the log (loss, learning rate, samples/s or the task's ``unit`` per second, e.g.
tokens/s, ETA) and to ``metrics.jsonl``, and every step is reported to
:mod:`models.training.progress` (the command line's progress bar).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from models.checkpoint_files import latest_checkpoint
from models.inference import cpu_has_native_bf16
from models.training import progress
from models.training.checkpoint import restore_rng, rng_state, save_checkpoint
from models.training.schedule import warmup_cosine

log = logging.getLogger("vlmcurate.train")


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings shared by all recipes."""

    max_steps: int
    lr: float
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    amp: str = "auto"
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> LoopConfig:
        """The loop settings a recipe's config carries under the same names, with ``overrides``."""
        names = [f.name for f in fields(cls) if hasattr(settings, f.name)]
        return cls(**{**{name: getattr(settings, name) for name in names}, **overrides})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1 or self.save_every < 1:
            raise ValueError("max_steps, grad_accum and save_every must be >= 1")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")


class TrainTask(Protocol):
    """What a recipe gives the loop.

    A task may also define ``model_state()`` and ``load_model_state(state)`` to checkpoint less
    than the whole model (the VLM keeps only what a stage trains); without them the loop saves
    and restores the model's full state dict.
    """

    model: torch.nn.Module

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]: ...

    def batches(self, epoch: int, skip: int) -> Iterator[Any]: ...

    def loss(self, batch: Any) -> tuple[torch.Tensor, int]: ...

    def after_step(self) -> None: ...

    def evaluate(self) -> dict[str, Any]: ...


class TrainLoop:
    """Runs a :class:`TrainTask` for ``config.max_steps`` optimizer steps, resuming from ``output_dir``."""

    def __init__(
        self,
        task: TrainTask,
        config: LoopConfig,
        output_dir: str | Path,
        *,
        device: torch.device,
        is_main: bool = True,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        self.task, self.config, self.device, self.is_main = task, config, device, is_main
        self.unit = getattr(task, "unit", "samples")  # what the second value of task.loss counts
        self.output_dir = Path(output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.extra_state = extra_state or {}
        groups = task.param_groups(config.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(
                step, total_steps=config.max_steps, warmup_steps=config.warmup_steps, min_ratio=config.min_lr_ratio
            ),
        )
        self.step = self.epoch = self.position = 0
        amp = config.amp if config.amp != "auto" else ("bf16" if _native_bf16(device) else "off")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else nullcontext

    def resume(self) -> bool:
        """Load the latest checkpoint of ``output_dir`` if there is one."""
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return False
        saved = torch.load(path, map_location="cpu", weights_only=False)
        loader = getattr(self.task, "load_model_state", None)
        (loader or _unwrap(self.task.model).load_state_dict)(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step, self.epoch, self.position = saved["step"], saved["epoch"], saved["position"]
        restore_rng(saved["rng"])
        if self.is_main:
            log.info(
                "resumed from %s: step %d, epoch %d, %d batches into it", path, self.step, self.epoch, self.position
            )
        return True

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; return the last step's metrics."""
        config = self.config
        if self.step >= config.max_steps:
            return {"step": self.step, "done": True}
        stream = self.task.batches(self.epoch, self.position)
        started, first_step = time.monotonic(), self.step
        metrics: dict[str, Any] = {}
        if self.is_main:
            progress.report(self.output_dir.name, self.step, config.max_steps)
        while self.step < config.max_steps:
            tick, samples, total = time.monotonic(), 0, 0.0
            for _ in range(config.grad_accum):
                batch, stream = self._next(stream)
                with self.autocast():
                    loss, n = self.task.loss(batch)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step}: lower lr or check data")
                (loss / config.grad_accum).backward()
                samples, total = samples + n, total + loss.item() / config.grad_accum
            _average_gradients(self.params)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.task.after_step()
            self.step += 1
            elapsed = time.monotonic() - tick
            rate = (time.monotonic() - started) / (self.step - first_step)
            metrics = {
                "step": self.step,
                "epoch": self.epoch,
                "loss": round(total, 5),
                "lr": self.scheduler.get_last_lr()[0],
                f"{self.unit}_per_s": round(samples / max(elapsed, 1e-9), 1),
                "eta_s": round(rate * (config.max_steps - self.step), 1),
            }
            if config.eval_every and self.step % config.eval_every == 0 and self.is_main:
                metrics["eval"] = self.task.evaluate()
            self._log(metrics)
            if self.step % config.save_every == 0 or self.step == config.max_steps:
                self.save()
        return metrics

    def _next(self, stream: Iterator[Any]) -> tuple[Any, Iterator[Any]]:
        for attempt in range(2):
            try:
                batch = next(stream)
                self.position += 1
                return batch, stream
            except StopIteration:
                if attempt:
                    break
                self.epoch, self.position = self.epoch + 1, 0
                stream = self.task.batches(self.epoch, 0)
        raise ValueError(
            "the training data yields no batch: is it empty, or smaller than one batch (with keep "
            "probabilities, an epoch draws only their sum of rows)?"
        )

    def save(self) -> None:
        if not self.is_main:
            return
        saver = getattr(self.task, "model_state", None)  # a task may keep only what it trains
        state = {
            "model": saver() if saver else _unwrap(self.task.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "rng": rng_state(),
            "loop": asdict(self.config),
            **self.extra_state,
        }
        path = save_checkpoint(self.checkpoints, self.step, state, self.config.keep_checkpoints)
        log.info("saved %s", path)

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(metrics["eta_s"]))
        line = (
            f"step {metrics['step']}/{self.config.max_steps} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
            f"lr {metrics['lr']:.2e} {metrics[f'{self.unit}_per_s']:.0f} {self.unit}/s eta {eta}"
        )
        if "eval" in metrics:
            line += " | " + " ".join(f"{k} {v:.4f}" for k, v in metrics["eval"].items() if isinstance(v, float))
        log.info(line)
        progress.report(self.output_dir.name, metrics["step"], self.config.max_steps, metrics)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, default=str) + "\n")


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over the workers of a distributed run (what DDP does, for any model
    access pattern: recipes may call heads directly on cached features)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
        param.grad.div_(world)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _native_bf16(device: torch.device) -> bool:
    """``amp: auto``'s choice: bf16 autocast on a GPU, and on a CPU that multiplies bf16 natively."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
