"""BLIP CapFilt stages: decode for BLIP, then write synthetic captions.

``BlipPreprocess`` (CPU tasks) decodes ``image`` and resizes it to the BLIP's square input
(bicubic, as BLIP's processor does) into the transient ``blip_pixels``; bad bytes are rejects.
``BlipCaption`` (actors, a GPU where there is one) writes ``num_captions`` captions per image
with BLIP's recipe by default: the prompt ``"a picture of "``, nucleus sampling with top_p 0.9
and repetition penalty 1.1 (``num_beams`` > 1 switches to beam search, one caption per beam).
The image is encoded once; its features are repeated for its captions, and the draws come from
:class:`models.sampling.NucleusSampler` (the distribution of transformers' sampling, at a fraction
of its per-step cost on a CPU).

Sampling is seeded per batch from ``seed`` and the batch's first ``source_index``; the seed is
written to ``caption_seed``, so the same run layout (shard size and batch size, both part of
the config) reproduces every caption under either runner.

The project's own VLM (``vlmcurate train vlm``) can take BLIP's place as the captioner:
:class:`generators.capfilt_vlm.VlmCaption` writes the same two columns the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.stage import GiB, Rejections, Resources, Stage, default_resources
from pipelines.stage.decode import DEFAULT_MAX_PIXELS, decode_to_pixels
from schemas.columns import BLIP_PIXELS, CAPTION_SEED, IMAGE, SOURCE_INDEX, SYNTHETIC_CAPTIONS

BLIP_PROMPT = "a picture of "


@dataclass
class BlipPreprocess(Stage):
    """Decodes ``image`` into the square input of the BLIP ``model`` (``blip_pixels``)."""

    name: ClassVar[str] = "blip_preprocess"
    input_columns: ClassVar[tuple[str, ...]] = (IMAGE,)
    output_columns: ClassVar[tuple[str, ...]] = (BLIP_PIXELS,)

    model: str = "config:blip-tiny"
    max_pixels: int = DEFAULT_MAX_PIXELS
    resources: Resources = default_resources(batch_size=256)

    def __post_init__(self) -> None:
        from models.blip import blip_image_spec

        self._size = blip_image_spec(self.model)[0]

    def identity(self) -> dict[str, Any]:
        return {"image_size": self._size, "resample": "bicubic"}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        def square(image: Image.Image) -> Image.Image:
            return image.convert("RGB").resize((self._size, self._size), Image.Resampling.BICUBIC)

        pixels, failures = decode_to_pixels(batch[IMAGE].to_pylist(), square, self.max_pixels)
        rejections = Rejections(batch.num_rows)
        rejections.add_each(failures)
        return rejections.attach(pa.table({BLIP_PIXELS: pa.array(pixels, pa.binary())}))


@dataclass
class BlipCaption(Stage):
    """Writes ``synthetic_captions``: ``num_captions`` captions per image from a BLIP captioner."""

    name: ClassVar[str] = "blip_caption"
    input_columns: ClassVar[tuple[str, ...]] = (SOURCE_INDEX, BLIP_PIXELS)
    output_columns: ClassVar[tuple[str, ...]] = (SYNTHETIC_CAPTIONS, CAPTION_SEED)

    model: str = "config:blip-tiny"
    num_captions: int = 5
    prompt: str = BLIP_PROMPT
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    num_beams: int = 1
    min_new_tokens: int = 5
    max_new_tokens: int = 30
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    # memory: one actor of configs/demo.yaml (blip-tiny, batches of 64, shards of 500 rows) peaked at 1.3 GiB
    resources: Resources = default_resources(batch_size=32, gpus=1.0, memory=int(1.75 * GiB))

    def __post_init__(self) -> None:
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")
        if self.num_beams > 1 and self.num_captions > self.num_beams:
            raise ValueError(
                f"beam search returns at most num_beams ({self.num_beams}) captions, "
                f"not num_captions {self.num_captions}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        from models.inference import check_precision

        check_precision(self.precision)

    def setup(self) -> None:
        import torch

        from models.blip import load_blip
        from models.inference import inference_device

        self._torch = torch
        self._device, self._dtype = inference_device(self.device, self.precision)
        self._bundle = load_blip("caption", self.model, device=str(self._device), dtype=self._dtype)
        # [CLS] prompt, without the tokenizer's closing [SEP]: the decoder continues it.
        prompt = self._bundle.tokenizer(self.prompt.strip(), return_tensors="pt").input_ids[:, :-1]
        self._prompt_ids = prompt.to(self._device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from transformers import LogitsProcessorList

        from models.inference import cpu_threads
        from models.sampling import NucleusSampler

        torch = self._torch
        n = batch.num_rows
        seed = int(self.seed * 1_000_003 + batch[SOURCE_INDEX][0].as_py()) if n else self.seed
        pixels = blip_pixels(batch, self._bundle, self._device).to(self._dtype)
        with cpu_threads(self._device, self.resources.cpus), torch.inference_mode():
            image = self._bundle.model.vision_model(pixel_values=pixels).last_hidden_state
            if self.num_beams > 1:
                out = self._decode(
                    image, do_sample=False, num_beams=self.num_beams, num_return_sequences=self.num_captions
                )
            else:  # one sequence per caption: the image features are repeated, not recomputed
                generator = torch.Generator(self._device).manual_seed(seed)
                sampler = NucleusSampler(self.top_p, self.temperature, generator)
                out = self._decode(
                    image.repeat_interleave(self.num_captions, dim=0),
                    do_sample=False,
                    logits_processor=LogitsProcessorList([sampler]),
                )
        texts = self._bundle.tokenizer.batch_decode(out, skip_special_tokens=True)
        prefix = self.prompt.strip().lower()
        texts = [t.strip()[len(prefix) :].strip() if t.strip().lower().startswith(prefix) else t.strip() for t in texts]
        captions = [texts[i * self.num_captions : (i + 1) * self.num_captions] for i in range(n)]
        return pa.table(
            {
                SYNTHETIC_CAPTIONS: pa.array(captions, pa.list_(pa.string())),
                CAPTION_SEED: pa.array([seed] * n, pa.int64()),
            }
        )

    def _decode(self, image: Any, **options: Any) -> Any:
        """BLIP's text decoder continuing the prompt over ``image`` features (one row per sequence
        unless ``num_return_sequences``), as ``BlipForConditionalGeneration.generate`` calls it."""
        model = self._bundle.model
        text = model.config.text_config
        rows = image.shape[0]
        prompt = self._prompt_ids.repeat(rows, 1)
        prompt[:, 0] = text.bos_token_id  # [CLS] -> [DEC]
        return model.text_decoder.generate(
            input_ids=prompt,
            eos_token_id=text.sep_token_id,
            pad_token_id=text.pad_token_id,
            encoder_hidden_states=image,
            encoder_attention_mask=self._torch.ones(image.shape[:-1], dtype=self._torch.long, device=image.device),
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            repetition_penalty=self.repetition_penalty,
            **options,
        )


def blip_pixels(batch: pa.Table, bundle: Any, device: Any) -> Any:
    """``blip_pixels`` as the normalised input batch of ``bundle``'s BLIP."""
    from models.inference import normalised_pixels

    return normalised_pixels(
        batch[BLIP_PIXELS].to_pylist(),
        bundle.image_size,
        bundle.mean,
        bundle.std,
        device,
        "blip_pixels (BlipPreprocess)",
    )
