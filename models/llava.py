"""The LLaVA-style vision-language model: a CLIP image tower, an MLP projector and a causal LM.

``load_llava(name)`` builds one from a JSON config in ``models/configs/llava/`` (or a dict):

- ``vision``: any name :func:`models.clip.load_clip` takes (a project config such as
  ``lit-effnet-minilm`` or ``tiny-vit``, an open_clip architecture with ``vision_pretrained``),
  optionally with ``vision_checkpoint`` from ``vlmcurate train clip``. Its visual tokens are a
  ViT's patch tokens from block ``vision_layer`` (LLaVA takes the second-to-last, ``-2``; the class
  token is dropped) or a CNN tower's last spatial feature map, one token per cell. ``merge_tokens``
  (k) concatenates each k x k block of neighbouring tokens into one token of k² times the width, as
  MiniGPT-v2 merges four neighbours (a grid whose side k does not divide is padded with zeros): the
  LM reads k² times fewer tokens per image and nothing is averaged away (a 7 x 7 map: 16 tokens).
  The tower is frozen and stays in eval mode.
- ``projector``: ``mlp2x_gelu`` (Linear, GELU, Linear, as LLaVA-1.5) or ``linear``.
- ``image_aspect_ratio``: ``pad`` (the default, as LLaVA-1.5) centres a wide or tall image on a
  square of the tower's mean colour before the tower's transform, so what lies near its edges is
  seen; ``crop`` leaves the tower's own resize and centre crop, which cuts a 4:3 image's sides by
  an eighth each (LLaVA-1). A checkpoint saved before the setting existed was trained with ``crop``.
- ``language_model``: any name :func:`models.causal_lm.load_causal_lm` takes
  (``packaged:smollm2-135m``, ``config:tiny-llama``, a hub id or folder).

The prompt carries the ``<image>`` token once; :mod:`models.llava_text` expands it to
:attr:`LlavaModel.image_tokens` copies and :meth:`LlavaModel.embed` writes the projected visual
tokens into those positions, so the LM sees ``[text, image tokens, text]`` with no other change.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from models.llava_text import IGNORE_INDEX

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "llava"
PROJECTORS = ("mlp2x_gelu", "linear")
ASPECT_RATIO_MODES = ("pad", "crop")


@dataclass
class LlavaConfig:
    """What a LLaVA-style model is made of (a JSON file in ``models/configs/llava/``)."""

    vision: str
    language_model: str
    vision_pretrained: str | None = None
    vision_checkpoint: str | None = None
    vision_layer: int = -2
    merge_tokens: int | None = None
    projector: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    chat_template: str | None = None
    max_length: int = 2048
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.image_aspect_ratio not in ASPECT_RATIO_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIO_MODES}, got {self.image_aspect_ratio!r}")
        if self.merge_tokens is not None and self.merge_tokens < 1:
            raise ValueError(f"merge_tokens must be a positive block side, got {self.merge_tokens}")

    @classmethod
    def load(cls, name_or_values: str | dict[str, Any]) -> LlavaConfig:
        if isinstance(name_or_values, dict):
            values = name_or_values
        else:
            path = CONFIG_DIR / f"{name_or_values}.json"
            if not path.is_file():
                known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
                raise ValueError(f"unknown VLM config {name_or_values!r}; project configs: {known}")
            values = json.loads(path.read_text())
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"VLM config: {e} (fields: {sorted(cls.__dataclass_fields__)})") from None


class VisionTokens(nn.Module):
    """A frozen CLIP image tower returning ``(batch, tokens, width)`` visual tokens."""

    def __init__(self, visual: nn.Module, layer: int, image_size: int, merge: int | None = None) -> None:
        super().__init__()
        self.visual, self.layer, self.merge = visual, layer, merge
        self.is_vit = hasattr(visual, "transformer") and hasattr(visual, "class_embedding")
        for param in self.visual.parameters():
            param.requires_grad_(False)
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, image_size, image_size))
        self.num_tokens, self.width = probe.shape[1], probe.shape[2]

    def train(self, mode: bool = True) -> VisionTokens:
        super().train(mode)
        self.visual.eval()  # frozen: batch-norm statistics and dropout stay as trained
        return self

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self._feature_map(pixels)  # (batch, channels, height, width)
        if self.merge is not None:
            k = self.merge
            grid = nn.functional.pad(grid, (0, -grid.shape[3] % k, 0, -grid.shape[2] % k))
            grid = nn.functional.pixel_unshuffle(grid, k)  # (batch, channels * k * k, height / k, width / k)
        return grid.flatten(2).transpose(1, 2)

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            out = self.visual.forward_intermediates(
                pixels, indices=[self.layer], intermediates_only=True, output_fmt="NCHW"
            )
            return out["image_intermediates"][0]
        trunk = getattr(self.visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "forward_features"):
            raise ValueError(
                f"{type(self.visual).__name__} is neither an open_clip ViT nor a timm tower: no patch tokens to take"
            )
        return trunk.forward_features(pixels)


def build_projector(kind: str, vision_width: int, text_width: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_width, text_width)
    return nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM; see the module docstring."""

    def __init__(
        self, config: LlavaConfig, vision: VisionTokens, language_model: nn.Module, image_token_id: int
    ) -> None:
        super().__init__()
        self.config, self.vision, self.language_model = config, vision, language_model
        self.image_token_id = image_token_id
        text_width = language_model.get_input_embeddings().embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.projector = build_projector(config.projector, vision.width, text_width)

    @property
    def image_tokens(self) -> int:
        return self.vision.num_tokens

    def embed(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each sample's image positions replaced by its projected visual tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        features = self.projector(self.vision(pixels).to(self.projector_dtype))
        slots = input_ids == self.image_token_id
        counts = slots.sum(dim=1)
        if not bool((counts == self.image_tokens).all()):
            raise ValueError(f"each sequence needs exactly {self.image_tokens} image tokens, got {counts.tolist()}")
        if features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{features.shape[0]} images for {input_ids.shape[0]} sequences")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """The LM's output; with ``labels``, ``loss`` is the mean NLL of the supervised next tokens.

        With labels the LM head runs only at the positions some sequence of the batch is supervised
        at (``logits_to_keep``), and ``logits`` holds those positions: prompt and image tokens need
        no vocabulary projection, which is a fifth of SmolLM2-135M's compute per token.
        """
        embeds = self.embed(pixels, input_ids)
        if labels is None:
            return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        targets = labels[:, 1:]
        kept = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=kept)
        out.loss = nn.functional.cross_entropy(
            out.logits.float().transpose(1, 2), targets[:, kept], ignore_index=IGNORE_INDEX
        )
        return out

    @torch.no_grad()
    def generate(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids only (the prompt is given as embeddings, so the LM returns no prompt ids)."""
        return self.language_model.generate(
            inputs_embeds=self.embed(pixels, input_ids), attention_mask=attention_mask, **kwargs
        )


@dataclass
class LlavaBundle:
    """A model with what feeds it: the image transform, the prepared tokenizer and the config."""

    model: LlavaModel
    tokenizer: Any
    preprocess: Any
    config: LlavaConfig
    spec: Any  # the tower's models.clip.PreprocessSpec: size, mean, std, interpolation

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.config), "image_tokens": self.model.image_tokens, "vision_width": self.model.vision.width}


def load_llava(
    config: str | dict[str, Any] | LlavaConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LlavaBundle:
    """Build the model of ``config`` (a project config name, a dict or a :class:`LlavaConfig`)."""
    from models.causal_lm import load_causal_lm
    from models.clip import load_clip
    from models.llava_text import prepare_tokenizer

    config = config if isinstance(config, LlavaConfig) else LlavaConfig.load(config)
    clip = load_clip(
        config.vision,
        pretrained=config.vision_pretrained,
        checkpoint=config.vision_checkpoint,
        init_seed=config.init_seed,
    )
    vision = VisionTokens(clip.model.visual, config.vision_layer, clip.spec.image_size, config.merge_tokens)
    language_model, tokenizer = load_causal_lm(config.language_model, dtype=dtype, init_seed=config.init_seed)
    image_token_id = prepare_tokenizer(tokenizer, config.chat_template)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng(devices=[]):  # seeded: checkpoints leave frozen rows out and rebuild them
            torch.manual_seed(config.init_seed)
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = LlavaModel(config, vision, language_model, image_token_id).to(device)
    return LlavaBundle(model=model, tokenizer=tokenizer, preprocess=clip.preprocess, config=config, spec=clip.spec)


def pixels(bundle: LlavaBundle, images: Sequence[bytes]) -> torch.Tensor:
    """Encoded images as the model's input batch: padded to a square first where the config says
    ``pad``, then the tower's eval transform."""
    tensors = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            tensors.append(image_input(bundle, image))
    return torch.stack(tensors)


def image_input(bundle: LlavaBundle, image: Image.Image) -> torch.Tensor:
    """One decoded image as the tower's input: RGB, padded to a square where the config says ``pad``."""
    rgb = image.convert("RGB")
    if bundle.config.image_aspect_ratio == "pad":
        rgb = pad_to_square(rgb, bundle.spec.mean)
    return bundle.preprocess(rgb)


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """``image`` centred on a square of its longer side, filled with the tower's mean colour (which
    normalises to zero), as LLaVA-1.5's ``expand2square``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(round(255 * m) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
