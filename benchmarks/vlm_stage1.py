"""Stage-1 VLM training on real data: held-out caption loss before and after, and sample captions.

The real offline configuration (``lit-smollm2``: the packaged EfficientNet-Lite0 LiT tower,
SmolLM2-135M-Instruct, a fresh 2-layer MLP projector) trains its projector on Flickr8k
(``../shared/data/flickr8k``): every caption of the first ``800 - holdout`` images, written as
parquet shards the recipe streams. The held-out images' first captions are scored before and
after (mean NLL per caption token, the ``plain`` template), and a few get a generated caption.
The baseline is the same model before training (a random projector).

    .venv/bin/python benchmarks/vlm_stage1.py [--steps 150] [--batch-size 16] [--holdout 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.evaluation.vlm import caption_loss, generate_captions  # noqa: E402
from models.llava import load_llava  # noqa: E402
from models.llava_text import prepare_tokenizer  # noqa: E402
from models.training.llava_data import caption_turns  # noqa: E402
from models.training.llava_recipe import VlmTrainConfig, load_vlm_weights, train_vlm  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--show", type=int, default=5)
    args = parser.parse_args()
    if not (FLICKR / "captions.jsonl").is_file():
        sys.exit(f"skipped: {FLICKR} is absent (the shared data folder)")
    rows = [json.loads(line) for line in (FLICKR / "captions.jsonl").read_text().splitlines()]
    train_rows, held = rows[: -args.holdout], rows[-args.holdout:]
    held_images = [(FLICKR / "images" / r["image"]).read_bytes() for r in held]
    held_samples = [(image, caption_turns(r["captions"][0])) for image, r in zip(held_images, held)]

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        pairs = [(f"{r['image']}-{i}", (FLICKR / "images" / r["image"]).read_bytes(), c)
                 for r in train_rows for i, c in enumerate(r["captions"])]
        for n, start in enumerate(range(0, len(pairs), 1000)):
            chunk = pairs[start:start + 1000]
            pq.write_table(pa.table({"uid": [p[0] for p in chunk], "image": [p[1] for p in chunk],
                                     "caption": [p[2] for p in chunk]}), shards / f"{n:05d}.parquet")

        bundle = load_llava("lit-smollm2")
        prepare_tokenizer(bundle.tokenizer, "plain")
        before = caption_loss(bundle, held_samples)
        print(f"held-out caption loss before: {before:.4f} nats/token ({len(held_samples)} images)")

        config = VlmTrainConfig(model="lit-smollm2", stage=1, train_data=[str(shards)],
                                output_dir=str(Path(tmp) / "out"), batch_size=args.batch_size, max_steps=args.steps,
                                lr=args.lr, warmup_steps=10, save_every=args.steps, shuffle_buffer=1000,
                                device="cpu", amp="off")
        start = time.perf_counter()
        metrics = train_vlm(config)
        seconds = time.perf_counter() - start
        print(f"trained {metrics['step']} steps x {args.batch_size} pairs ({len(pairs)} train pairs) in "
              f"{seconds:.0f} s, {metrics.get('tokens_per_s')} tokens/s at the last step, "
              f"last loss {metrics.get('loss')}")

        load_vlm_weights(bundle.model, config.output_dir)
        after = caption_loss(bundle, held_samples)
        print(f"held-out caption loss after: {after:.4f} nats/token")
        for r, caption in zip(held, generate_captions(bundle, held_images[: args.show])):
            print(f"  {r['image']}: generated {caption!r} | reference {r['captions'][0]!r}")
    print(f"result: vlm_stage1_heldout_loss ours={after:.4f} baseline={before:.4f} ratio={after / before:.3f} "
          "nats/token")


if __name__ == "__main__":
    main()
