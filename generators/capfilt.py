"""BLIP CapFilt stages: decode for BLIP, then write synthetic captions.

``BlipPreprocess`` (CPU tasks) decodes ``image`` and resizes it to the BLIP's square input
(bicubic, as BLIP's processor does) into the transient ``blip_pixels``; bad bytes are rejects.
``BlipCaption`` (actors, a GPU where there is one) writes ``num_captions`` captions per image
with BLIP's recipe by default: the prompt ``"a picture of "``, nucleus sampling with top_p 0.9
and repetition penalty 1.1 (``num_beams`` > 1 switches to beam search, one caption per beam).

Sampling is seeded per batch from ``seed`` and the batch's first ``source_index``; the seed is
written to ``caption_seed``, so the same run layout (shard size and batch size, both part of
the config) reproduces every caption under either runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.decode import DEFAULT_MAX_PIXELS, decode_to_pixels
from pipelines.stage import Rejections, Resources, Stage, default_resources
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
    resources: Resources = default_resources(batch_size=32, gpus=1.0)

    def __post_init__(self) -> None:
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")
        if self.num_beams > 1 and self.num_captions > self.num_beams:
            raise ValueError(f"beam search returns at most num_beams ({self.num_beams}) captions, "
                             f"not num_captions {self.num_captions}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        from models.inference import check_precision

        check_precision(self.precision)

    def setup(self) -> None:
        import torch

        from models.blip import load_blip
        from models.inference import inference_device

        self._torch = torch
        self._device, self._dtype = inference_device(self.device, self.precision, self.resources.cpus)
        self._bundle = load_blip("caption", self.model, device=str(self._device), dtype=self._dtype)
        # The prompt without its trailing [SEP]: generation continues it (BLIP replaces [CLS] by [DEC]).
        prompt = self._bundle.tokenizer(self.prompt.strip(), return_tensors="pt").input_ids[:, :-1]
        self._prompt_ids = prompt.to(self._device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        torch = self._torch
        n = batch.num_rows
        seed = int(self.seed * 1_000_003 + batch[SOURCE_INDEX][0].as_py()) if n else self.seed
        pixels = blip_pixels(batch, self._bundle, self._device).to(self._dtype)
        prompt = self._prompt_ids.repeat(n, 1)  # generate writes [DEC] into column 0: no shared views
        sampling = self.num_beams == 1
        options = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                       repetition_penalty=self.repetition_penalty, num_return_sequences=self.num_captions)
        if sampling:
            options.update(do_sample=True, top_p=self.top_p, temperature=self.temperature, top_k=0)
        else:
            options.update(do_sample=False, num_beams=self.num_beams)
        with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = self._bundle.model.generate(pixel_values=pixels, input_ids=prompt, **options)
        texts = self._bundle.tokenizer.batch_decode(out, skip_special_tokens=True)
        prefix = self.prompt.strip().lower()
        texts = [t.strip()[len(prefix):].strip() if t.strip().lower().startswith(prefix) else t.strip() for t in texts]
        captions = [texts[i * self.num_captions:(i + 1) * self.num_captions] for i in range(n)]
        return pa.table({SYNTHETIC_CAPTIONS: pa.array(captions, pa.list_(pa.string())),
                         CAPTION_SEED: pa.array([seed] * n, pa.int64())})


def blip_pixels(batch: pa.Table, bundle: Any, device: Any) -> Any:
    """``blip_pixels`` as the normalised input batch of ``bundle``'s BLIP."""
    from models.inference import normalised_pixels

    return normalised_pixels(batch[BLIP_PIXELS].to_pylist(), bundle.image_size, bundle.mean, bundle.std, device,
                             "blip_pixels (BlipPreprocess)")
