"""The local instruction backend: batched, length-sorted generation against a per-request generate loop.

Both generate replies for the same instruction prompts (built from Flickr8k captions in
``../shared/data/flickr8k``) with the packaged SmolLM2-135M-Instruct, greedy, the same
``max_new_tokens``. Ours is :class:`generators.instruct.local.LocalChat` (no cache); the
baseline calls ``model.generate`` once per prompt, as a script would. Prints completion
tokens/s of both, and how many of our replies parse as the JSON each response type asks for
(a 135M model writes little usable JSON: this is the figure that says so).

    .venv/bin/python benchmarks/instruct_local.py [--images 4] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generators.instruct.context import build_context  # noqa: E402
from generators.instruct.local import LocalChat, LocalSettings  # noqa: E402
from generators.instruct.prompts import RESPONSE_TYPES, load_prompt  # noqa: E402
from generators.instruct.responses import ReplyError, parse_reply  # noqa: E402
from models.causal_lm import load_causal_lm  # noqa: E402

CAPTIONS = ROOT.parent / "shared" / "data" / "flickr8k" / "captions.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if not CAPTIONS.is_file():
        sys.exit(f"skipped: {CAPTIONS} is absent (the shared data folder)")
    rows = [json.loads(line) for line in CAPTIONS.read_text().splitlines()[: args.images]]
    jobs = [
        (kind, load_prompt(kind).messages(build_context(r["captions"][:2], None, max_chars=300).render()))
        for r in rows
        for kind in RESPONSE_TYPES
    ]
    settings = LocalSettings(
        max_new_tokens=args.max_new_tokens, temperature=0, batch_size=args.batch_size, device="cpu", dtype=args.dtype
    )
    chat = LocalChat(settings)
    start = time.perf_counter()
    replies = chat.complete([messages for _, messages in jobs])
    ours_seconds = time.perf_counter() - start
    ours_tokens = sum(r.completion_tokens for r in replies)

    model, tokenizer = load_causal_lm(settings.model, dtype=getattr(torch, args.dtype))
    start, base_tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for _, messages in jobs:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            out = model.generate(
                **ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            base_tokens += out.shape[1] - ids["input_ids"].shape[1]
    base_seconds = time.perf_counter() - start

    parsed: Counter[str] = Counter()
    for (kind, _), reply in zip(jobs, replies):
        try:
            parse_reply(kind, reply.text, "x")
            parsed[kind] += reply.finish_reason != "length"
        except ReplyError:
            pass
    per_type = len(rows)
    print(
        f"{len(jobs)} requests ({args.images} images x {len(RESPONSE_TYPES)} types), greedy, "
        f"max_new_tokens {args.max_new_tokens}, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"ours: {ours_tokens} tokens in {ours_seconds:.1f} s; per-request loop: {base_tokens} in {base_seconds:.1f} s"
    )
    print(
        "replies that parse and were not cut off: "
        + ", ".join(f"{kind} {parsed[kind]}/{per_type}" for kind in RESPONSE_TYPES)
    )
    ours, base = ours_tokens / ours_seconds, base_tokens / base_seconds
    print(f"result: instruct_local ours={ours:.1f} baseline={base:.1f} ratio={ours / base:.2f} tokens/s")


if __name__ == "__main__":
    main()
