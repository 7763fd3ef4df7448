"""Contrastive CLIP training on exported shards (``vlmcurate train clip CONFIG``).

open_clip's loss and lock options over the shared :class:`TrainLoop`. When both towers are fully
locked and are of kinds whose trunk and head are separate (timm image towers, Hugging Face text
towers: the LiT model), the frozen tower outputs are computed once (eval transform, no
augmentation) and the heads train on those cached features: the same gradients at a fraction
of the cost. Otherwise images are decoded per step with open_clip's train transform.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from models.clip import ClipBundle, load_clip
from models.training.loop import LoopConfig, TrainLoop
from models.training.shards import Sample, epoch_samples, in_epoch, resolve_shards

log = logging.getLogger("vlmcurate.train")


class EvalSettings(BaseModel):
    """Periodic evaluation: zero-shot on a labelled image set, retrieval on a captioned one."""

    model_config = ConfigDict(extra="forbid")
    zeroshot: str | None = None
    zeroshot_per_class: int | None = 100
    retrieval: str | None = None
    retrieval_images: str | None = None
    retrieval_limit: int | None = 200


class ClipTrainConfig(BaseModel):
    """Everything ``vlmcurate train clip`` reads from its YAML (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "lit-effnet-minilm"
    pretrained: str | None = None
    init_checkpoint: str | None = None
    train_data: list[str] = Field(min_length=1)
    output_dir: str
    batch_size: int = Field(default=256, ge=2)
    max_steps: int = Field(default=300, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float | None = 1.0
    amp: Literal["auto", "bf16", "off"] = "auto"
    save_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=0, ge=0)
    seed: int = 0
    lock_image: bool = True
    lock_image_unlocked_groups: int = Field(default=0, ge=0)
    lock_text: bool = True
    lock_text_unlocked_layers: int = Field(default=0, ge=0)
    cache_features: Literal["auto", "off"] = "auto"
    shuffle_buffer: int = Field(default=1000, ge=0)
    decode_threads: int = Field(default=4, ge=1)
    device: str = "auto"
    eval: EvalSettings | None = None

    def loop_config(self) -> LoopConfig:
        return LoopConfig.from_settings(self)


class ClipTask:
    """The CLIP recipe as a :class:`~models.training.loop.TrainTask`."""

    def __init__(self, config: ClipTrainConfig, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        from open_clip.loss import ClipLoss

        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.bundle: ClipBundle = load_clip(
            config.model,
            pretrained=config.pretrained,
            checkpoint=config.init_checkpoint,
            device=device,
            init_seed=config.seed,
        )
        model = self.bundle.model
        if config.lock_image:
            # open_clip's freeze_bn_stats swaps timm's BatchNormAct2d for a plain frozen BN and drops
            # its activation (features blow up); _train_mode keeps locked statistics in eval instead.
            model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups)
        if config.lock_text:
            model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers, freeze_layer_norm=True)
        self.model = model
        self.files = resolve_shards(config.train_data)
        self.loss_fn = ClipLoss(rank=rank, world_size=world_size, gather_with_grad=world_size > 1)
        self.skipped: list[dict[str, str]] = []
        self.cache = self._build_cache() if self._cacheable() else None

    # -- what the loop calls -------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """open_clip's split: no weight decay on gains, biases and the temperature."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exempt else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def batches(self, epoch: int, skip: int) -> Iterator[Any]:
        self._train_mode()
        if self.cache is not None:
            return self._cached_batches(epoch, skip)
        return self._decoded_batches(epoch, skip)

    def loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        model = self.model
        if self.cache is not None:
            image_features, text_features = batch
            image = model.visual.head(image_features)
            text = model.text.proj(text_features)
        else:
            images, tokens = batch
            image, text = model.encode_image(images), model.encode_text(tokens)
        image = torch.nn.functional.normalize(image, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
        return self.loss_fn(image, text, model.logit_scale.exp()), image.shape[0] * self.world_size

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, float(np.log(100)))

    def evaluate(self) -> dict[str, Any]:
        from models.evaluation.runner import evaluate_settings

        self.model.eval()
        try:
            return evaluate_settings(self.bundle, self.config.eval, device=self.device)
        finally:
            self._train_mode()

    def _train_mode(self) -> None:
        """Train mode, except that a locked image tower keeps its batch-norm statistics and a
        fully locked text tower runs without dropout, as in LiT."""
        self.model.train()
        if self.config.lock_image:
            for module in self.model.visual.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if self.config.lock_text and not self.config.lock_text_unlocked_layers and hasattr(self.model, "text"):
            self.model.text.eval()
            head = getattr(self.model.text, "proj", None)
            if isinstance(head, torch.nn.Module):
                head.train()

    # -- streaming decoded images --------------------------------------------------------------
    def _decoded_batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """Full batches only (every worker of a distributed run steps in lockstep): a sample
        that cannot be decoded is recorded and replaced by the next one."""
        samples = epoch_samples(
            self.files,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=self.config.shuffle_buffer,
        )
        size = self.config.batch_size // self.world_size
        with ThreadPoolExecutor(self.config.decode_threads) as pool:
            for _ in range(skip):  # replay what the resumed run consumed, without augmenting
                if len(_take(samples, size, lambda group: [s for s in group if _loads(s)])) < size:
                    return
            while True:
                kept = _take(
                    samples,
                    size,
                    lambda group: [
                        (image, s.caption)
                        for image, s in zip(
                            pool.map(lambda s: self._decode(s, self.bundle.train_preprocess), group), group
                        )
                        if image is not None
                    ],
                )
                if len(kept) < size:
                    return
                images = torch.stack([image for image, _ in kept]).to(self.device)
                tokens = self.bundle.tokenizer([caption for _, caption in kept]).to(self.device)
                yield images, tokens

    def _decode(self, sample: Sample, transform: Any) -> torch.Tensor | None:
        try:
            with Image.open(io.BytesIO(sample.image)) as image:
                return transform(image)
        except Exception as e:  # noqa: BLE001 - any undecodable sample is recorded, never fatal
            self._skip(sample, f"{type(e).__name__}: {e}")
            return None

    def _skip(self, sample: Sample, reason: str) -> None:
        self.skipped.append({"key": sample.key, "reason": reason})
        out = Path(self.config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "skipped.jsonl", "a") as f:
            f.write(json.dumps({"key": sample.key, "reason": reason}) + "\n")

    # -- cached frozen-tower features ----------------------------------------------------------
    def _cacheable(self) -> bool:
        from open_clip.hf_model import HFTextEncoder
        from open_clip.timm_model import TimmModel

        c = self.config
        locked = c.lock_image and c.lock_text and not c.lock_image_unlocked_groups and not c.lock_text_unlocked_layers
        text = getattr(self.model, "text", None)
        kinds = isinstance(self.model.visual, TimmModel) and isinstance(text, HFTextEncoder)
        return c.cache_features == "auto" and locked and kinds

    def _build_cache(self) -> dict[str, torch.Tensor]:
        path = Path(self.config.output_dir) / f"feature_cache-rank{self.rank}.pt"
        fingerprint = {
            "model": self.bundle.source,
            "files": [(str(f), f.stat().st_size) for f in self.files],
            "rank": self.rank,
            "world_size": self.world_size,
            "columns": ["image", "text", "keys", "keep_probability"],
        }
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if saved["fingerprint"] == fingerprint:
                return saved["features"]
        image_parts, text_parts, keys, chances = [], [], [], []
        samples = epoch_samples(
            self.files, seed=0, epoch=0, rank=self.rank, world_size=self.world_size, shuffle_buffer=0, every_sample=True
        )
        model = self.model.eval()
        with ThreadPoolExecutor(self.config.decode_threads) as pool, torch.inference_mode():
            for group in _groups(samples, 64):
                decoded = list(pool.map(lambda s: self._decode(s, self.bundle.preprocess), group))
                kept = [(image, s) for image, s in zip(decoded, group) if image is not None]
                if not kept:
                    continue
                keys += [s.key for _, s in kept]
                chances += [s.keep_probability for _, s in kept]
                images = torch.stack([image for image, _ in kept]).to(self.device)
                tokens = self.bundle.tokenizer([s.caption for _, s in kept]).to(self.device)
                image_parts.append(model.visual.trunk(images).float().cpu())
                mask = (tokens != model.text.config.pad_token_id).long()
                text_parts.append(
                    model.text.pooler(model.text.transformer(input_ids=tokens, attention_mask=mask), mask).float().cpu()
                )
        if not image_parts:
            raise ValueError(f"no decodable sample in {len(self.files)} training shard(s)")
        features = {
            "image": torch.cat(image_parts),
            "text": torch.cat(text_parts),
            "keys": keys,
            "keep_probability": torch.tensor(chances, dtype=torch.float64),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": fingerprint, "features": features}, path)
        log.info("cached frozen-tower features of %d samples in %s", len(features["image"]), path)
        return features

    def _cached_batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """The cached samples of this epoch (:func:`in_epoch`) in an order fixed by seed and epoch."""
        chances = self.cache["keep_probability"].numpy()
        members = np.flatnonzero(in_epoch(self.config.seed, epoch, self.cache["keys"], chances))
        count = len(members)
        size = self.config.batch_size // self.world_size
        order = members[np.random.default_rng([self.config.seed, epoch, self.rank]).permutation(count)]
        for index in range(skip, count // size):
            rows = torch.from_numpy(order[index * size : (index + 1) * size])
            yield self.cache["image"][rows].to(self.device), self.cache["text"][rows].to(self.device)


def _take(samples: Iterator[Sample], size: int, convert: Any) -> list[Any]:
    """Up to ``size`` converted samples: ``convert`` maps a list of samples to the usable results."""
    kept: list[Any] = []
    while len(kept) < size:
        group = [s for _, s in zip(range(size - len(kept)), samples)]
        if not group:
            break
        kept += convert(group)
    return kept


def _loads(sample: Sample) -> Sample | None:
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            image.load()
        return sample
    except Exception:  # noqa: BLE001 - only counts whether the sample decodes
        return None


def _groups(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    group: list[Sample] = []
    for sample in samples:
        group.append(sample)
        if len(group) == size:
            yield group
            group = []
    if len(group) >= 2:
        yield group


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_clip(
    config: ClipTrainConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None
) -> dict[str, Any]:
    """Train (or resume) one CLIP run; returns the last step's metrics. In a distributed run
    (``rank``/``world_size`` of an initialised process group) features are gathered for the
    loss and gradients averaged by the loop; rank 0 writes logs and checkpoints."""
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    device = device or resolve_device(config.device)
    task = ClipTask(config, device, rank, world_size)
    out = Path(config.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.model_dump_json(indent=1))
    extra = {
        "model_name": task.bundle.name,
        "preprocess": asdict(task.bundle.spec),
        "recipe": "clip",
        "config": config.model_dump(),
    }
    loop = TrainLoop(task, config.loop_config(), out, device=device, is_main=rank == 0, extra_state=extra)
    loop.resume()
    metrics = loop.fit()
    if task.skipped and rank == 0:
        log.warning("%d training sample(s) could not be decoded; see %s", len(task.skipped), out / "skipped.jsonl")
    return metrics
