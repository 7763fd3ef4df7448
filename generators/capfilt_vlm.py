"""The project's own VLM as CapFilt's captioner: ``generators.capfilt_vlm:VlmCaption``.

A model trained with ``vlmcurate train vlm`` takes BLIP's place in the CapFilt chain: it writes
``synthetic_captions`` and ``caption_seed`` exactly as :class:`~generators.capfilt.BlipCaption`
does, so the filters after it (BLIP's ITM head, or the CLIP score) and ``CapFiltSelect`` run
unchanged. The stage decodes ``image`` itself with the VLM tower's eval transform (no separate
preprocess stage: the LM's decoding dwarfs it); images that do not decode are rejects
(``not_an_image``, ``decompression_bomb``, ``decode_error``).

Captions follow BLIP's sampling recipe by default (nucleus, top_p 0.9, repetition penalty 1.1),
``num_captions`` per image from one pass of the vision tower, seeded per batch from ``seed`` and
the batch's first ``source_index`` (written to ``caption_seed``); ``greedy: true`` writes the one
most likely caption instead. The prompt is the trained template's with ``instruction`` after the
image (empty: the stage-1 caption prompt).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.stage import GiB, Rejections, Resources, Stage, default_resources
from pipelines.stage.decode import DECODE_ERROR, DEFAULT_MAX_PIXELS, DecodeLimits, ImageRejected, check_header
from schemas.columns import CAPTION_SEED, IMAGE, SOURCE_INDEX, SYNTHETIC_CAPTIONS


@dataclass
class VlmCaption(Stage):
    """Writes ``synthetic_captions``: ``num_captions`` captions per image from a trained VLM."""

    name: ClassVar[str] = "vlm_caption"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, IMAGE)
    output_columns: ClassVar[tuple[str, ...]] = (SYNTHETIC_CAPTIONS, CAPTION_SEED)

    weights: str | None = None  # a `vlmcurate train vlm` output folder or .pt file
    model: str | None = None  # or an untrained VLM config (throughput checks, tests)
    num_captions: int = 5
    instruction: str = ""
    greedy: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    min_new_tokens: int = 3
    max_new_tokens: int = 30
    seed: int = 0
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # memory: one actor of the demo's VLM (lit-smollm2, shards of 96 rows) peaked at 1.6 GiB
    resources: Resources = default_resources(batch_size=16, gpus=1.0, memory=int(2.5 * GiB))

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.model is None):
            raise ValueError("VlmCaption needs exactly one of weights (a trained VLM) and model (a VLM config)")
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")
        if self.greedy and self.num_captions != 1:
            raise ValueError(f"greedy decoding writes one caption per image, not num_captions {self.num_captions}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def setup(self) -> None:
        import torch

        from models.inference import inference_device
        from models.llava import image_input, load_llava
        from models.llava_text import encode_prompt
        from models.training.vlm_checkpoint import load_trained_vlm
        from schemas.llava import HUMAN, IMAGE_TOKEN

        self._torch, self._image_input = torch, image_input
        self._device, _ = inference_device(self.device, "fp32")
        if self.weights is not None:
            self._bundle = load_trained_vlm(self.weights, device=self._device)
        else:
            self._bundle = load_llava(self.model, device=self._device)
            self._bundle.model.eval()
        model = self._bundle.model
        value = f"{IMAGE_TOKEN}\n{self.instruction}" if self.instruction else IMAGE_TOKEN
        self._prompt = encode_prompt(
            self._bundle.tokenizer,
            [{"from": HUMAN, "value": value}],
            image_token_id=model.image_token_id,
            image_tokens=model.image_tokens,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        seed = int(self.seed * 1_000_003 + batch[SOURCE_INDEX][0].as_py()) if n else self.seed
        tensors, failures = self._decode(batch[IMAGE].to_pylist())
        rejections = Rejections(n)
        rejections.add_each(failures)
        rows = [i for i, t in enumerate(tensors) if t is not None]
        texts = self._caption([tensors[i] for i in rows], seed) if rows else []
        captions: list[list[str] | None] = [None] * n
        for j, row in enumerate(rows):
            captions[row] = texts[j * self.num_captions : (j + 1) * self.num_captions]
        table = pa.table(
            {
                SYNTHETIC_CAPTIONS: pa.array(captions, pa.list_(pa.string())),
                CAPTION_SEED: pa.array([seed] * n, pa.int64()),
            }
        )
        return rejections.attach(table)

    def _decode(self, bodies: list[bytes | None]) -> tuple[list[Any], list[tuple[int, str, str]]]:
        from PIL import Image

        tensors: list[Any] = []
        failures: list[tuple[int, str, str]] = []
        for i, body in enumerate(bodies):
            try:
                if body is None:
                    raise ImageRejected("not_an_image", "no image bytes")
                check_header(body, DecodeLimits(max_pixels=self.max_pixels))
                with Image.open(io.BytesIO(body)) as image:
                    tensors.append(self._image_input(self._bundle, image))
            except ImageRejected as e:
                failures.append((i, e.reason, e.detail))
                tensors.append(None)
            except (OSError, SyntaxError, ValueError) as e:
                failures.append((i, DECODE_ERROR, f"{type(e).__name__}: {e}"))
                tensors.append(None)
        return tensors, failures

    def _caption(self, tensors: list[Any], seed: int) -> list[str]:
        """``num_captions`` texts per image, image by image; the prompt embeds are computed once per image."""
        from transformers import LogitsProcessorList

        from models.inference import cpu_threads
        from models.sampling import NucleusSampler

        torch, model, tokenizer = self._torch, self._bundle.model, self._bundle.tokenizer
        pixels = torch.stack(tensors).to(self._device)
        ids = torch.tensor([self._prompt] * len(tensors), device=self._device)
        options: dict[str, Any] = {
            "do_sample": False,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "repetition_penalty": self.repetition_penalty,
        }
        if not self.greedy:
            generator = torch.Generator(self._device).manual_seed(seed)
            options["logits_processor"] = LogitsProcessorList([NucleusSampler(self.top_p, self.temperature, generator)])
        with cpu_threads(self._device, self.resources.cpus), torch.inference_mode(), warnings.catch_warnings():
            # The penalty applies to new tokens only: the prompt is image slots and template markers.
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            embeds = model.embed(pixels, ids).repeat_interleave(self.num_captions, dim=0)
            out = model.language_model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self._device),
                **options,
            )
        return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
