"""Download throughput: the project's download stage against raw img2dataset, same urls, one run.

Real images (../shared/data/flickr8k JPEGs and tuxpaint PNGs) are served on 127.0.0.1 by a
separate process; each image appears under several urls (a query string) to reach --urls. Both
sides use the same processes and threads, resize mode, size and encoding, no retries, and write
their output (img2dataset: webdataset tars + parquet; ours: parquet shards with the ledger).
Wall time includes each tool's start-up (process spawn and imports; Ray start and actors).

    .venv/bin/python benchmarks/download.py [--urls 15000] [--processes 2] [--threads 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loopback import serve  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESIZE = dict(
    image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg", encode_quality=95
)


def load_images() -> list[bytes]:
    images = [p.read_bytes() for p in sorted((SHARED / "flickr8k" / "images").glob("*.jpg"))]
    with tarfile.open(SHARED / "tuxpaint" / "stamps.tar") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.lower().endswith((".png", ".jpg", ".jpeg")):
                images.append(tar.extractfile(member).read())
    return images


def run_img2dataset(pool: str, out: str, processes: int, threads: int) -> tuple[float, int]:
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=pool,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=out,
        output_format="webdataset",
        processes_count=processes,
        thread_count=threads,
        timeout=10,
        retries=0,
        number_sample_per_shard=1000,
        distributor="multiprocessing",
        compute_hash="sha256",
        disallowed_header_directives=[],
        enable_wandb=False,
        **RESIZE,
    )
    seconds = time.perf_counter() - start
    successes = sum(json.loads(p.read_text())["successes"] for p in Path(out).glob("*_stats.json"))
    return seconds, successes


def run_ours(pool: str, out: str, processes: int, threads: int) -> tuple[float, int]:
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.engine.runner import RayRunner
    from pipelines.job import build_plan

    config = parse_config(
        {
            "name": "bench",
            "input": pool,
            "output_dir": out,
            "runner": "ray",
            "shard_size": 1000,
            "ray": {"num_cpus": processes + 1},  # + the CPU the read/write tasks get beside the actors
            "stages": [
                {
                    "stage": "pipelines.download:Download",
                    "threads": threads,
                    "timeout": 10,
                    "retries": 0,
                    "allow_addresses": ["127.0.0.1"],
                    "disallowed_header_directives": [],
                    "resources": {"concurrency": processes},
                    **RESIZE,
                }
            ],
        }
    )
    start = time.perf_counter()
    runner = RayRunner(config.ray)
    try:
        manifest = run_pipeline(build_plan(config), runner)
    finally:
        runner.close()
    return time.perf_counter() - start, manifest.phases[-1].rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=15000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    if not (SHARED / "flickr8k").exists():
        sys.exit(f"skipped: {SHARED} not found (clone the project beside ../shared)")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    images = load_images()
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(images, ports), daemon=True)
    server.start()
    port = ports.get(timeout=30)
    with tempfile.TemporaryDirectory() as tmp:
        pool = os.path.join(tmp, "pool.parquet")
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://127.0.0.1:{port}/{i}.jpg?copy={i // len(images)}" for i in range(args.urls)],
                    "caption": [f"image {i}" for i in range(args.urls)],
                }
            ),
            pool,
        )
        print(
            f"{args.urls:,} urls over {len(images):,} real images; {args.processes} processes x "
            f"{args.threads} threads; {RESIZE}"
        )
        base_s, base_ok = run_img2dataset(pool, os.path.join(tmp, "img2dataset"), args.processes, args.threads)
        print(f"img2dataset: {base_ok:,} images in {base_s:.1f} s = {base_ok / base_s:,.0f} images/s")
        ours_s, ours_ok = run_ours(pool, os.path.join(tmp, "ours"), args.processes, args.threads)
        print(f"vlmcurate:   {ours_ok:,} images in {ours_s:.1f} s = {ours_ok / ours_s:,.0f} images/s")
    server.terminate()
    if ours_ok != base_ok:
        print(f"WARNING: successes differ ({ours_ok} vs {base_ok})")
    ours, base = ours_ok / ours_s, base_ok / base_s
    print(f"result: download ours={ours:.0f} baseline={base:.0f} ratio={ours / base:.2f} images/s")


if __name__ == "__main__":
    main()
