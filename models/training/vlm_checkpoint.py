"""VLM checkpoints hold what a stage trained; loading one rebuilds the rest from its config.

A stage-1 checkpoint stores the projector, a stage-2 one the projector and the LM (or the LM's
LoRA adapters), next to the model config and the LoRA settings. Everything frozen is rebuilt from
the config (packaged weights, or a seeded random init, both deterministic), so a stage-1
checkpoint of ``lit-smollm2`` is a few MB instead of the 540 MB of the whole model.

:func:`load_trained_vlm` turns a checkpoint (a file, or a training output folder) into a ready
:class:`~models.llava.LlavaBundle` with LoRA adapters merged into the LM: what evaluation,
CapFilt and the transformers export take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.checkpoint_files import latest_checkpoint
from models.llava import LlavaBundle, LlavaConfig, load_llava
from models.llava_text import prepare_tokenizer

DESCRIBED_ONLY = ("image_tokens", "vision_width")  # in a checkpoint's "vlm" entry, not config fields


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``model``'s state dict that are parameters with ``requires_grad``."""
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    return {name: value for name, value in model.state_dict().items() if name in names}


def load_partial_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (a subset of ``model``'s entries, or all of them); unknown entries are errors."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(
            f"the checkpoint has {len(unexpected)} entries this model lacks, e.g. {unexpected[:3]}: "
            "was it trained with another VLM config or LoRA settings?"
        )


def wrap_lora(language_model: torch.nn.Module, settings: dict[str, Any]) -> torch.nn.Module:
    """``language_model`` with peft LoRA adapters (``settings``: r, alpha, dropout, target_modules)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        language_model,
        LoraConfig(
            r=settings["r"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules=list(settings["target_modules"]),
            task_type="CAUSAL_LM",
        ),
    )


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or the latest checkpoint of a training output folder."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"no VLM checkpoint at {path}")
        return path
    file = latest_checkpoint(path / "checkpoints")
    if file is None:
        raise FileNotFoundError(f"no checkpoint under {path}/checkpoints")
    return file


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(checkpoint_file(path), map_location="cpu", weights_only=False)


def apply_checkpoint(bundle: LlavaBundle, saved: dict[str, Any]) -> None:
    """Load a checkpoint's weights into ``bundle``'s (unwrapped) model, merging LoRA adapters into the LM."""
    model = bundle.model
    lora = saved.get("lora")
    if not lora:
        load_partial_state(model, saved["model"])
        return
    wrapped = wrap_lora(model.language_model, lora)
    model.language_model = wrapped
    load_partial_state(model, saved["model"])
    model.language_model = wrapped.merge_and_unload()


def saved_config(saved: dict[str, Any]) -> LlavaConfig:
    if "vlm" not in saved:
        raise ValueError("not a VLM checkpoint (no 'vlm' entry): was it written by `vlmcurate train vlm`?")
    values = {k: v for k, v in saved["vlm"].items() if k not in DESCRIBED_ONLY}
    values.setdefault("image_aspect_ratio", "crop")  # saved before the setting existed: trained cropped
    return LlavaConfig.load(values)


def load_trained_vlm(path: str | Path, *, device: str | torch.device = "cpu") -> LlavaBundle:
    """The model a VLM training run saved (file or output folder), in eval mode on ``device``, its
    tokenizer set to the chat template the run trained with."""
    saved = read_checkpoint(path)
    bundle = load_llava(saved_config(saved))
    apply_checkpoint(bundle, saved)
    if "chat_template" in saved:  # prompts as the stage saw them ("plain" after stage 1)
        prepare_tokenizer(bundle.tokenizer, saved["chat_template"])
    bundle.model.to(device).eval()
    return bundle
