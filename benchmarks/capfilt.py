"""CapFilt captioning throughput: the batched stages against a per-image ``generate`` loop.

Same real images (the first ``--images`` Flickr8k JPEGs of ``../shared/data/flickr8k``), same
BLIP (a project config with random weights, ``blip-small`` by default: a 6-layer ViT at 224 px
and a 4-layer 384-wide text decoder), same decoding (BLIP's prompt ``"a picture of "``, nucleus
sampling top_p 0.9, repetition penalty 1.1, ``--captions`` per image, ``--new-tokens`` new
tokens each: a random model rarely samples the end token, so both sides write full-length
captions), same torch threads, one process:

- baseline: what BLIP's users write (BLIP issues #58, #97), per image: PIL-decode, run
  transformers' ``BlipImageProcessor``, tokenize the prompt, ``model.generate`` with
  ``num_return_sequences`` = captions (the charitable form: one call per image, not one per
  caption), decode;
- ours: ``generators.capfilt:BlipPreprocess`` then ``BlipCaption`` called on Arrow batches of
  ``--batch-size`` rows, as a worker runs them (decode and resize per batch, one ``generate``
  for every caption of every image in the batch).

Model loading is not timed on either side; each side first captions one batch untimed (warm-up).
Each round times both; the result line gives the medians of the rounds.

    .venv/bin/python benchmarks/capfilt.py [--model blip-small] [--images 64] [--captions 5]
        [--batch-size 32] [--new-tokens 20] [--threads N] [--rounds 3] [--device cpu|cuda]
        [--precision auto|fp32|fp16|bf16]

On a GPU (``--device cuda``) use ``--model blip-base`` (BLIP-base's architecture at 384 px,
random weights) and ``--precision fp16``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generators.capfilt import BLIP_PROMPT, BlipCaption, BlipPreprocess  # noqa: E402
from models.blip import load_blip  # noqa: E402
from pipelines.stage import Resources  # noqa: E402
from schemas.columns import BLIP_PIXELS, IMAGE, SOURCE_INDEX, SYNTHETIC_CAPTIONS  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def load_images(count: int) -> list[bytes]:
    files = sorted(FLICKR.glob("*.jpg"))[:count]
    if len(files) < count:
        sys.exit(f"skipped: need {count} images under {FLICKR}, found {len(files)}")
    return [p.read_bytes() for p in files]


def decoding(args: argparse.Namespace) -> dict:
    return dict(
        do_sample=True,
        top_p=0.9,
        top_k=0,
        temperature=1.0,
        repetition_penalty=1.1,
        num_return_sequences=args.captions,
        min_new_tokens=args.new_tokens,
        max_new_tokens=args.new_tokens,
    )


class PerImageLoop:
    """The baseline: one ``generate`` call per image, preprocessed by transformers' processor."""

    def __init__(self, args: argparse.Namespace, device: str, dtype) -> None:
        import torch
        from transformers import BlipImageProcessor

        self.torch = torch
        self.bundle = load_blip("caption", f"config:{args.model}", device=device, dtype=dtype)
        size = self.bundle.image_size
        self.processor = BlipImageProcessor(
            size={"height": size, "width": size}, image_mean=list(self.bundle.mean), image_std=list(self.bundle.std)
        )
        self.device, self.dtype, self.options = device, dtype, decoding(args)

    def __call__(self, images: list[bytes], seed: int) -> list[str]:
        from PIL import Image

        torch, tokenizer = self.torch, self.bundle.tokenizer
        torch.manual_seed(seed)
        captions = []
        for data in images:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            pixels = self.processor(images=image, return_tensors="pt").pixel_values.to(self.device, self.dtype)
            prompt = tokenizer(BLIP_PROMPT.strip(), return_tensors="pt").input_ids.to(self.device)
            with torch.inference_mode():
                out = self.bundle.model.generate(pixel_values=pixels, input_ids=prompt, **self.options)
            captions += tokenizer.batch_decode(out, skip_special_tokens=True)
        return captions


class BatchedStages:
    """Ours: the two CapFilt stages on Arrow batches, as a pipeline worker calls them."""

    def __init__(self, args: argparse.Namespace, device: str, threads: int) -> None:
        model = f"config:{args.model}"
        self.preprocess = BlipPreprocess(model=model)
        self.caption = BlipCaption(
            model=model,
            num_captions=args.captions,
            min_new_tokens=args.new_tokens,
            max_new_tokens=args.new_tokens,
            device=device,
            precision=args.precision,
            resources=Resources(batch_size=args.batch_size, cpus=threads, gpus=0),
        )
        self.caption.setup()
        self.batch_size = args.batch_size

    def __call__(self, images: list[bytes], seed: int) -> list[str]:
        self.caption.seed = seed
        captions = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = pa.table(
                {
                    SOURCE_INDEX: pa.array(range(start, start + len(chunk)), pa.int64()),
                    IMAGE: pa.array(chunk, pa.binary()),
                }
            )
            pixels = self.preprocess(batch).column(BLIP_PIXELS)
            out = self.caption(pa.table({SOURCE_INDEX: batch[SOURCE_INDEX], BLIP_PIXELS: pixels}))
            captions += [c for row in out[SYNTHETIC_CAPTIONS].to_pylist() for c in row]
        return captions


def timed(side, images: list[bytes], seed: int) -> tuple[float, int]:
    start = time.perf_counter()
    captions = side(images, seed)
    return time.perf_counter() - start, len(captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blip-small")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    import torch

    from models.inference import inference_device

    torch.set_num_threads(args.threads)
    device, dtype = inference_device(args.device, args.precision)
    images = load_images(args.images)
    baseline = PerImageLoop(args, str(device), dtype)
    ours = BatchedStages(args, str(device), args.threads)
    print(
        f"model {args.model}, {args.images} Flickr8k images, {args.captions} captions each, {args.new_tokens} new "
        f"tokens, batch {args.batch_size}, {args.threads} torch threads, device {device}, dtype {dtype}"
    )
    baseline(images[:2], seed=0)
    ours(images[: args.batch_size], seed=0)
    rates = {"ours": [], "baseline": []}
    for round_ in range(args.rounds):
        for name, side in (("ours", ours), ("baseline", baseline)):
            seconds, captions = timed(side, images, seed=round_ + 1)
            rates[name].append(captions / seconds)
            print(f"round {round_ + 1} {name}: {captions} captions in {seconds:.2f} s = {captions / seconds:.1f}/s")
    sample = ours(images[:1], seed=99)[: args.captions]
    print("sample captions (random weights):", sample)
    ours_rate, base_rate = statistics.median(rates["ours"]), statistics.median(rates["baseline"])
    print(
        f"result: capfilt_captions ours={ours_rate:.1f} baseline={base_rate:.1f} "
        f"ratio={ours_rate / base_rate:.2f} captions/s"
    )


if __name__ == "__main__":
    main()
