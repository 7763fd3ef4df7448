"""Instruction requests: achieved throughput against the ideal, and a rerun that sends nothing.

A loopback OpenAI-compatible server (``tests/openai_server.py``, in its own process) answers
every chat request after a fixed ``--latency`` (100 ms). The ``InstructGenerate`` stage (openai
backend, one response type, so one request per row) sends ``--rows`` requests with at most
``--concurrency`` C in flight, in batches of ``--batch-size`` rows as a pipeline worker would.
The ideal is C / latency requests/s; the result is achieved / ideal (goal >= 0.9). Then the same
rows go through a fresh stage on the same cache file: the number of requests the server received
is printed (0 expected).

    .venv/bin/python benchmarks/instruct.py [--rows 1280] [--concurrency 16] [--latency 0.1]
        [--batch-size 256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generators.instruct import InstructGenerate  # noqa: E402
from pipelines.stage import Resources  # noqa: E402
from tests.openai_server import FakeChatServer  # noqa: E402

KEY_ENV = "VLMCURATE_BENCH_KEY"


def serve(latency: float, queue, stop) -> None:
    with FakeChatServer(latency=latency) as server:
        queue.put(server.base_url)
        stop.wait()
        queue.put((sum(server.answered.values()), server.max_in_flight))


def stage(base_url: str, cache: str, args: argparse.Namespace) -> InstructGenerate:
    instruct = InstructGenerate(
        backend="openai",
        response_types=["reasoning"],
        cache=cache,
        endpoint={
            "model": "bench",
            "base_url": base_url,
            "api_key_env": KEY_ENV,
            "concurrency": args.concurrency,
            "timeout": 30,
        },
        resources=Resources(batch_size=args.batch_size),
    )
    instruct.setup()
    return instruct


def run(instruct: InstructGenerate, rows: int, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, rows, batch_size):
        count = min(batch_size, rows - first)
        batch = pa.table(
            {
                "uid": [f"u{i}" for i in range(first, first + count)],
                "caption": [f"a kite over a beach, number {i}" for i in range(first, first + count)],
            }
        )
        out = instruct(batch)
        assert "_reject_reason" not in out.column_names, "a request failed"
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1280)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    os.environ[KEY_ENV] = "bench"
    context = multiprocessing.get_context("spawn")
    queue, stop = context.Queue(), context.Event()
    server = context.Process(target=serve, args=(args.latency, queue, stop), daemon=True)
    server.start()
    base_url = queue.get(timeout=30)
    with tempfile.TemporaryDirectory() as folder:
        cache = str(Path(folder) / "cache.sqlite")
        seconds = run(stage(base_url, cache, args), args.rows, args.batch_size)
        rerun = stage(base_url, cache, args)
        rerun_seconds = run(rerun, args.rows, args.batch_size)
        stop.set()
        answered, peak = queue.get(timeout=30)
        server.join()
    achieved, ideal = args.rows / seconds, args.concurrency / args.latency
    print(
        f"{args.rows} requests, concurrency {args.concurrency}, latency {args.latency * 1000:.0f} ms: "
        f"{seconds:.2f} s, {achieved:.1f} requests/s (ideal {ideal:.1f}); peak in flight at the server {peak}"
    )
    print(
        f"rerun on the same cache: {rerun._chat.sent} requests sent, server answered {answered - args.rows} "
        f"new, {rerun_seconds:.2f} s"
    )
    print(f"result: instruct_requests ours={achieved:.1f} baseline={ideal:.1f} ratio={achieved / ideal:.3f} requests/s")


if __name__ == "__main__":
    main()
