"""VLM training throughput: the recipe (streamed records, encoding, the shared loop) against a bare loop.

Both train the same model (``--model``, default the tiny ``tiny-vit-llama``; ``lit-smollm2`` for the
real offline one) with AdamW for ``--steps`` steps at batch ``--batch-size`` on the same
conversations. The baseline is what a user writes by hand with transformers: the batches
tokenized and collated once, up front, then forward, backward and step in a loop. Ours is
``train_vlm`` reading a LLaVA export from disk and encoding every record as it streams. Both
count the non-padding tokens per second after ``--warmup`` steps; the ratio is ours over the
baseline (the goal is >= 0.9).

    .venv/bin/python benchmarks/train_step.py [--model tiny-vit-llama] [--steps 30] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.llava import load_llava, pixels  # noqa: E402
from models.llava_text import collate, encode_conversation, prepare_tokenizer  # noqa: E402
from models.training.llava_recipe import VlmTrainConfig, train_vlm  # noqa: E402
from tests.http_server import make_image  # noqa: E402

ANSWER = "The picture shows a small red boat tied to a wooden pier on a calm lake, with hills behind it."


def write_export(folder: Path, records: int) -> list[tuple[bytes, list[dict[str, str]]]]:
    """A LLaVA export of ``records`` two-exchange conversations; the same samples are returned."""
    (folder / "images").mkdir(parents=True)
    (folder / "stage2").mkdir()
    samples, rows = [], []
    for i in range(records):
        image = make_image(256, 256, seed=i)
        (folder / "images" / f"{i}.jpg").write_bytes(image)
        turns = [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": ANSWER},
            {"from": "human", "value": "Is the water calm?"},
            {"from": "gpt", "value": f"Yes, sample {i}."},
        ]
        rows.append({"id": str(i), "image": f"images/{i}.jpg", "conversations": turns})
        samples.append((image, turns))
    (folder / "stage2" / "00000.json").write_text(json.dumps(rows))
    return samples


def bare_loop(model_name: str, samples, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    bundle = load_llava(model_name)
    image_token = prepare_tokenizer(bundle.tokenizer, bundle.config.chat_template)
    model = bundle.model
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        encoded = [
            encode_conversation(
                bundle.tokenizer,
                turns,
                image_token_id=image_token,
                image_tokens=model.image_tokens,
                max_length=bundle.config.max_length,
            )
            for _, turns in chunk
        ]
        batches.append(
            {"pixels": pixels(bundle, [image for image, _ in chunk]), **collate(encoded, bundle.tokenizer.pad_token_id)}
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    tokens, started = 0, None
    for step in range(steps):
        if step == warmup:
            tokens, started = 0, time.perf_counter()
        batch = batches[step % len(batches)]
        loss = model(batch["pixels"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - started)


def recipe(model_name: str, data: Path, out: Path, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    config = VlmTrainConfig(
        model=model_name,
        stage=2,
        train_data=[str(data)],
        output_dir=str(out),
        batch_size=batch_size,
        max_steps=steps,
        lr=lr,
        warmup_steps=0,
        save_every=10 * steps,
        shuffle_buffer=0,
        device="cpu",
        amp="off",
    )
    train_vlm(config)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    # Batches hold nearly the same token count, so the harmonic mean of the per-step rates is
    # total tokens over total time (an arithmetic mean would favour the fast steps).
    return len(lines) / sum(1 / x["tokens_per_s"] for x in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit-llama")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_export(Path(tmp) / "llava", args.batch_size * 4)
        ours = recipe(
            args.model, Path(tmp) / "llava", Path(tmp) / "out", args.batch_size, args.steps, args.warmup, args.lr
        )
        base = bare_loop(args.model, samples, args.batch_size, args.steps, args.warmup, args.lr)
    print(
        f"{args.model}, batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up), CPU threads "
        f"{torch.get_num_threads()}: recipe {ours:.0f} tokens/s, bare loop {base:.0f} tokens/s"
    )
    print(f"result: train_step ours={ours:.1f} baseline={base:.1f} ratio={ours / base:.3f} tokens/s")


if __name__ == "__main__":
    main()
