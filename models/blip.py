"""BLIP models for CapFilt: the captioner and the image-text-matching (ITM) filter.

``load_blip(task, model)`` returns a :class:`BlipBundle` (model, tokenizer, preprocessing) for
``task`` ``caption`` (transformers' ``BlipForConditionalGeneration``) or ``itm``
(``BlipForImageTextRetrieval``). ``model`` is one of:

- ``config:<name>``: a project config in ``models/configs/blip/`` (``blip-tiny``), random
  weights from a seed: for tests and benchmarks, no download;
- a local checkpoint folder, or a hub name (``Salesforce/blip-image-captioning-base``,
  ``Salesforce/blip-itm-base-coco``) for users with the network: ``from_pretrained``.

BLIP's tokenizer is BERT's uncased WordPiece with ``[DEC]`` (the captioner's start token, id
30522) and ``[ENC]`` (30523) added. A checkpoint folder brings its own; otherwise it is built
offline from the ``vocab.txt`` the packaged MiniLM ships, which is bert-base-uncased's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.clip import PACKAGED

BLIP_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "blip"
CONFIG_PREFIX = "config:"
TASKS = ("caption", "itm")
#: What BLIP adds to the BERT vocabulary, in this order (so their ids are 30522 and 30523).
DECODER_START, ENCODER_START = "[DEC]", "[ENC]"
#: BLIP's (and CLIP's) image normalisation, used by its processors.
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BlipBundle:
    """A BLIP model for one task with the tokenizer and the pixel preprocessing it expects."""

    task: str
    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict[str, Any]


def blip_configs() -> dict[str, Path]:
    """The project's BLIP configs by name."""
    return {p.stem: p for p in sorted(BLIP_CONFIG_DIR.glob("*.json"))}


def blip_tokenizer(folder: str | None = None):
    """BLIP's tokenizer: from a checkpoint ``folder`` if it has one, else from the packaged
    bert-base-uncased vocabulary, with ``[DEC]`` as bos and ``[ENC]`` added, as BLIP does."""
    from transformers import BertTokenizer

    if folder is not None and (Path(folder) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    vocab = Path(PACKAGED["all-minilm-l6-v2"]()) / "vocab.txt"
    tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)  # transformers 5: `vocab` is the file
    tokenizer.add_special_tokens({"bos_token": DECODER_START, "additional_special_tokens": [ENCODER_START]})
    return tokenizer


def blip_image_spec(model: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image size, mean, std) of a BLIP, read from its config without loading weights."""
    if model.startswith(CONFIG_PREFIX):
        _, spec = _project_config(model)
        return spec["image_size"], tuple(spec["image_mean"]), tuple(spec["image_std"])
    from transformers import BlipConfig

    mean, std = _processor_normalisation(model)
    return BlipConfig.from_pretrained(model).vision_config.image_size, mean, std


def load_blip(
    task: str, model: str, device: str = "cpu", dtype: torch.dtype | None = None, init_seed: int = 0
) -> BlipBundle:
    """Load the captioner (``task='caption'``) or the ITM filter (``task='itm'``); see the module."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cls = BlipForConditionalGeneration if task == "caption" else BlipForImageTextRetrieval
    if model.startswith(CONFIG_PREFIX):
        path, spec = _project_config(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            network = cls(BlipConfig(**spec["blip"]))
        tokenizer = blip_tokenizer()
        size, mean, std = spec["image_size"], tuple(spec["image_mean"]), tuple(spec["image_std"])
        source = {"config": model, "path": str(path), "init_seed": init_seed}
    else:
        network = cls.from_pretrained(model)  # a hub name or a local folder, for users with weights
        tokenizer = blip_tokenizer(model) if Path(model).is_dir() else _hub_tokenizer(model)
        size = network.config.vision_config.image_size
        mean, std = _processor_normalisation(model)
        source = {"checkpoint": model}
    _check_vocabulary(network, tokenizer, model)
    network.to(device=device, dtype=dtype).eval()
    return BlipBundle(task, network, tokenizer, size, mean, std, source)


def _project_config(model: str) -> tuple[Path, dict[str, Any]]:
    name = model[len(CONFIG_PREFIX) :]
    configs = blip_configs()
    if name not in configs:
        raise ValueError(f"unknown BLIP config {name!r}; known: {sorted(configs)}")
    return configs[name], json.loads(configs[name].read_text())


def _hub_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _processor_normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's image mean and std from its processor config, BLIP's if it has none."""
    folder = Path(model)
    config = folder / "preprocessor_config.json"
    if config.exists():
        data = json.loads(config.read_text())
        return tuple(data.get("image_mean", BLIP_MEAN)), tuple(data.get("image_std", BLIP_STD))
    return BLIP_MEAN, BLIP_STD


def _check_vocabulary(network: torch.nn.Module, tokenizer: Any, model: str) -> None:
    text = network.config.text_config
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"{model}: the tokenizer has {len(tokenizer)} tokens, the text model only {text.vocab_size}")
    if tokenizer.bos_token_id != text.bos_token_id:
        raise ValueError(
            f"{model}: the tokenizer's bos ({tokenizer.bos_token!r}, id {tokenizer.bos_token_id}) is "
            f"not the text model's bos_token_id {text.bos_token_id}: captions would start wrong"
        )
