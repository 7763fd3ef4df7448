"""Stage-1 VLM training on real data: held-out caption loss before and after, and sample captions.

The real offline configuration (``lit-smollm2``: the packaged EfficientNet-Lite0 LiT tower,
SmolLM2-135M-Instruct, a fresh 2-layer MLP projector) trains its projector on Flickr8k
(``../shared/data/flickr8k``): every caption of the first ``800 - holdout`` images, written as
parquet shards the recipe streams. The held-out images are evaluated before and after with
``vlmcurate eval vlm``'s caption evaluation: mean NLL per caption token over all their references
(the ``plain`` template), and a greedy caption per image scored with BLEU-4 and CIDEr-D. The
baseline is the same model before training (a random projector).

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

from models.evaluation.datasets import CaptionedImageSet  # noqa: E402
from models.evaluation.vlm import evaluate_captions  # noqa: E402
from models.llava import load_llava  # noqa: E402
from models.llava_text import prepare_tokenizer  # noqa: E402
from models.training.llava_recipe import VlmTrainConfig, train_vlm  # noqa: E402
from models.training.vlm_checkpoint import load_trained_vlm  # noqa: E402

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
    train_rows, held = rows[: -args.holdout], rows[-args.holdout :]

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        pairs = [
            (f"{r['image']}-{i}", (FLICKR / "images" / r["image"]).read_bytes(), c)
            for r in train_rows
            for i, c in enumerate(r["captions"])
        ]
        for n, start in enumerate(range(0, len(pairs), 1000)):
            chunk = pairs[start : start + 1000]
            pq.write_table(
                pa.table(
                    {"uid": [p[0] for p in chunk], "image": [p[1] for p in chunk], "caption": [p[2] for p in chunk]}
                ),
                shards / f"{n:05d}.parquet",
            )

        held_jsonl = Path(tmp) / "heldout.jsonl"
        held_jsonl.write_text("\n".join(json.dumps({"image": r["image"], "captions": r["captions"]}) for r in held))
        held_set = CaptionedImageSet(held_jsonl, FLICKR / "images")

        bundle = load_llava("lit-smollm2")
        prepare_tokenizer(bundle.tokenizer, "plain")
        before = evaluate_captions(bundle, held_set, show=args.show)
        _report("before", before)

        config = VlmTrainConfig(
            model="lit-smollm2",
            stage=1,
            train_data=[str(shards)],
            output_dir=str(Path(tmp) / "out"),
            batch_size=args.batch_size,
            max_steps=args.steps,
            lr=args.lr,
            warmup_steps=10,
            save_every=args.steps,
            shuffle_buffer=1000,
            device="cpu",
            amp="off",
        )
        start = time.perf_counter()
        metrics = train_vlm(config)
        seconds = time.perf_counter() - start
        print(
            f"trained {metrics['step']} steps x {args.batch_size} pairs ({len(pairs)} train pairs) in "
            f"{seconds:.0f} s, {metrics.get('tokens_per_s')} tokens/s at the last step, "
            f"last loss {metrics.get('loss')}"
        )

        after = evaluate_captions(load_trained_vlm(config.output_dir), held_set, show=args.show)
        _report("after", after)
    print(
        f"result: vlm_stage1_heldout_loss ours={after['caption_loss']:.4f} baseline={before['caption_loss']:.4f} "
        f"ratio={after['caption_loss'] / before['caption_loss']:.3f} nats/token"
    )


def _report(when: str, result: dict) -> None:
    print(
        f"{when}: held-out caption loss {result['caption_loss']:.4f} nats/token over {result['references']} "
        f"captions of {result['images']} images; BLEU-4 {result['bleu4']:.4f}, CIDEr-D {result['cider_d']:.4f}"
    )
    for example in result["examples"]:
        print(f"  {example['image']}: generated {example['generated']!r} | reference {example['references'][0]!r}")


if __name__ == "__main__":
    main()
