"""Training the LLaVA-style VLM in two stages (``vlmcurate train vlm CONFIG``).

- **Stage 1** (projector pretraining): the vision tower and the LM are frozen, only the projector
  learns, on caption records (``stage1`` of a LLaVA export, or image-caption shards), by default
  with the ``plain`` template (the image, then the caption). LLaVA: LR 1e-3, batch 256, 1 epoch.
  ``projector_warmup`` first trains the projector alone to map each image onto the words of its
  caption (:mod:`models.training.projector_warmup`), where a short stage 1 would not teach it to see.
- **Stage 2** (instruction tuning): the projector and the LM learn (or LoRA adapters on the LM,
  through peft), on ``stage2`` records with the tokenizer's chat template, starting from the
  stage-1 checkpoint. LLaVA: LR 2e-5, batch 128; LoRA r=128, alpha=256. ``record_sets: [1, 2]``
  mixes the brief-description records in, with their instructions and the chat template, as
  LLaVA-1.5 mixes captioning data into its instructions (so "describe briefly" is answered in a
  sentence, not with a detailed description). ``response_types`` trains on records of those types
  only (each record's ``meta.response_type`` in the export: ``brief``, ``conversation``,
  ``presence``, ...), as a LLaVA data mix is chosen by type.

Only assistant turns are supervised, with labels from token offsets (:mod:`models.llava_text`).
A record that cannot be encoded (roles out of order, ``<image>`` missing or twice, too long, an
image that does not decode) is skipped, counted and written to ``rejected.jsonl`` in the output
folder with its reason; it never trains as an all-masked sample. Optimisation, AMP, accumulation,
logging, checkpoints and resume are the shared :class:`~models.training.loop.TrainLoop`'s; the
stream position is part of the checkpoint, so a resumed run continues with the next batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.llava import LlavaBundle, load_llava, pixels
from models.llava_text import EncodeError, collate, encode_conversation, prepare_tokenizer
from models.training.llava_data import VlmSample, iter_vlm_file, resolve_vlm_shards
from models.training.loop import LoopConfig, TrainLoop
from models.training.projector_warmup import ProjectorWarmup, warm_projector
from models.training.shards import epoch_samples
from models.training.vlm_checkpoint import (
    apply_checkpoint,
    load_partial_state,
    read_checkpoint,
    trainable_state,
    wrap_lora,
)

log = logging.getLogger("vlmcurate.train")
UNDECODABLE = "image_undecodable"


class LoraSettings(BaseModel):
    """LoRA adapters on the LM's linear layers (stage 2)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=128, ge=1)
    alpha: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class VlmTrainConfig(BaseModel):
    """Everything ``vlmcurate train vlm`` reads from its YAML (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    model: str | dict[str, Any] = "lit-smollm2"
    stage: Literal[1, 2] = 1
    record_sets: list[Literal[1, 2]] | None = Field(default=None, min_length=1)
    response_types: list[str] | None = Field(default=None, min_length=1)
    init_checkpoint: str | None = None
    train_data: list[str] = Field(min_length=1)
    output_dir: str
    chat_template: str | None = "auto"
    batch_size: int = Field(default=16, ge=1)
    max_steps: int = Field(default=300, ge=1)
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float | None = 1.0
    amp: Literal["auto", "bf16", "off"] = "auto"
    save_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    train_lm: bool | None = None
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    projector_warmup: ProjectorWarmup | None = None
    shuffle_buffer: int = Field(default=1000, ge=0)
    length_grouping: int = Field(default=16, ge=0)
    device: str = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_in_stage_1(self) -> VlmTrainConfig:
        if self.projector_warmup is not None and self.stage != 1:
            raise ValueError("projector_warmup is a stage-1 setting: stage 2 starts from stage 1's projector")
        return self

    def loop_config(self) -> LoopConfig:
        lr = self.lr if self.lr is not None else (1e-3 if self.stage == 1 else 2e-5)
        return LoopConfig.from_settings(self, lr=lr)

    @property
    def records(self) -> list[int]:
        """The export's record sets this stage reads: its own unless ``record_sets`` says otherwise."""
        return list(dict.fromkeys(self.record_sets)) if self.record_sets else [self.stage]

    @property
    def trains_lm(self) -> bool:
        return self.train_lm if self.train_lm is not None else self.stage == 2


class VlmTask:
    """A VLM training stage as a :class:`~models.training.loop.TrainTask`."""

    unit = "tokens"

    def __init__(self, config: VlmTrainConfig, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.bundle: LlavaBundle = load_llava(config.model)
        if config.init_checkpoint:
            apply_checkpoint(self.bundle, read_checkpoint(config.init_checkpoint))
        self.template = config.chat_template
        if self.template == "auto":
            self.template = "plain" if config.stage == 1 else self.bundle.config.chat_template
        self.image_token_id = prepare_tokenizer(self.bundle.tokenizer, self.template)
        self._configure_training()
        self.model = self.bundle.model.to(device)
        self.files = resolve_vlm_shards(config.train_data, config.records)
        self.rejected: Counter[str] = Counter()
        self._rejects_path = Path(config.output_dir) / "rejected.jsonl"

    def _configure_training(self) -> None:
        model, config = self.bundle.model, self.config
        for param in model.language_model.parameters():
            param.requires_grad_(config.trains_lm and config.lora is None)
        if config.lora is not None:
            model.language_model = wrap_lora(model.language_model, config.lora.model_dump())
        if config.gradient_checkpointing and (config.trains_lm or config.lora is not None):
            model.language_model.gradient_checkpointing_enable()
            model.language_model.enable_input_require_grads()

    # -- what the loop calls -------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for _, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """Full batches of the epoch's stream (a last partial batch is left out of the epoch).

        With ``length_grouping`` n, each window of n batches' worth of samples is sorted by length,
        cut into batches and the batches shuffled (the megabatches of transformers' group_by_length):
        a caption and a long conversation rarely share a batch, so little compute goes to padding.
        """
        self.model.train()
        rng = random.Random(f"{self.config.seed}:{epoch}:{self.rank}:length")
        window_size = self.config.batch_size * max(self.config.length_grouping, 1)
        samples = self._encoded(epoch)
        produced = 0
        while window := list(itertools.islice(samples, window_size)):
            for batch in self._grouped(window, rng):
                produced += 1
                if produced > skip:
                    yield self._collate(batch)

    def _grouped(self, window: list[tuple[torch.Tensor, Any]], rng: random.Random) -> list[list[Any]]:
        size = self.config.batch_size
        if self.config.length_grouping:
            window = sorted(window, key=lambda pair: len(pair[1].input_ids))
        batches = [window[i : i + size] for i in range(0, len(window) - size + 1, size)]
        if self.config.length_grouping:
            rng.shuffle(batches)
        return batches

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(batch["pixels"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        return out.loss, int(batch["attention_mask"].sum())

    def after_step(self) -> None:
        return None

    def model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the trained parameters only (the rest is rebuilt from the config)."""
        return trainable_state(self.model)

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        load_partial_state(self.model, state)

    def checkpoint_extras(self) -> dict[str, Any]:
        """What a checkpoint needs besides weights to rebuild the model as it was trained."""
        return {
            "vlm": self.bundle.describe(),
            "stage": self.config.stage,
            "chat_template": self.template,
            "lora": self.config.lora.model_dump() if self.config.lora else None,
        }

    def evaluate(self) -> dict[str, Any]:
        return {}

    # -- samples -------------------------------------------------------------------------------
    def _encoded(self, epoch: int) -> Iterator[tuple[torch.Tensor, Any]]:
        for sample in epoch_samples(
            self.files,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=self.config.shuffle_buffer,
            reader=self.read_file,
        ):
            try:
                encoded = encode_conversation(
                    self.bundle.tokenizer,
                    sample.turns,
                    image_token_id=self.image_token_id,
                    image_tokens=self.model.image_tokens,
                    max_length=self.bundle.config.max_length,
                )
                pixels = self.pixels_of(sample)
            except EncodeError as e:
                self._reject(sample, e.reason, str(e), epoch)
                continue
            yield pixels, encoded

    def read_file(self, path: Path) -> Iterator[VlmSample]:
        """The samples of one file that this stage trains on (``response_types``, where set)."""
        return iter_vlm_file(path, self.config.response_types)

    def pixels_of(self, sample: VlmSample) -> torch.Tensor:
        """The sample's image as the tower's input; :class:`EncodeError` where it does not decode."""
        try:
            return pixels(self.bundle, [sample.image])[0]
        except (OSError, ValueError) as e:
            raise EncodeError(UNDECODABLE, f"{type(e).__name__}: {e}") from None

    def _collate(self, batch: list[tuple[torch.Tensor, Any]]) -> dict[str, torch.Tensor]:
        tensors = collate([encoded for _, encoded in batch], self.bundle.tokenizer.pad_token_id)
        return {"pixels": torch.stack([pixels for pixels, _ in batch]), **tensors}

    def _reject(self, sample: VlmSample, reason: str, detail: str, epoch: int) -> None:
        self.rejected[reason] += 1
        if epoch == 0 and self.rank == 0:  # each record once, not once per epoch
            self._rejects_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._rejects_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"id": sample.id, "reason": reason, "detail": detail}) + "\n")


def train_vlm(
    config: VlmTrainConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None
) -> dict[str, Any]:
    """Run (or resume) one training stage; return the last step's metrics with the reject counts."""
    device = device or _device(config.device)
    torch.manual_seed(config.seed + rank)
    task = VlmTask(config, device, rank, world_size)
    loop = TrainLoop(
        task,
        config.loop_config(),
        config.output_dir,
        device=device,
        is_main=rank == 0,
        extra_state=task.checkpoint_extras(),
    )
    warmup = None
    if not loop.resume() and config.projector_warmup is not None:
        warmup = warm_projector(task, config.projector_warmup)
    metrics = loop.fit()
    return {**metrics, "rejected": dict(task.rejected), **({"projector_warmup": warmup} if warmup else {})}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
