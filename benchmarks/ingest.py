"""Ingest throughput: a LAION-like parquet pool read into input shards by the runner's workers.

The pool is generated (url and caption columns with LAION-like lengths, files of 1M rows in row
groups of 100k, as LAION's parquet is cut). The same pool is ingested by a run of no stages with
the Ray runner on 2 CPUs (2 workers: ours) and on 1 CPU (1 worker: the baseline), and by the local
runner (everything in the driver, as ingest ran before it was a phase of the runner); every run
must give the same shards (ledger and uids). Each run is a child process, so its peak RSS is the
driver's own (Ray's workers are other processes).

    .venv/bin/python benchmarks/ingest.py [--rows 10000000] [--shard-size 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILE_ROWS = 1_000_000
ROW_GROUP = 100_000
WORDS = np.array("a the of photo dog cat red blue on in with and old new man woman car tree city sky".split())


def write_pool(folder: Path, rows: int, seed: int = 0) -> None:
    """Files of up to 1M rows: urls of 40-140 characters, captions of 2-40 words."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        ids = pa.array(np.arange(start, start + n).astype(str))
        pads = pa.array(np.array(["x" * k for k in range(100)])[rng.integers(0, 100, n)])
        url = pc.binary_join_element_wise("https://img.example.com/", pads, "/", ids, ".jpg", "")
        words = np.clip(rng.lognormal(2.0, 0.6, n).astype(np.int64), 2, 40)
        offsets = pa.array(np.concatenate([[0], np.cumsum(words)]), pa.int64())
        flat = pa.chunked_array([pa.array(WORDS[rng.integers(0, len(WORDS), int(words.sum()))])]).combine_chunks()
        caption = pc.binary_join(pa.LargeListArray.from_arrays(offsets, flat), " ")
        pq.write_table(
            pa.table({"url": url, "caption": caption}), folder / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP
        )


def ingest(pool: str, out: str, runner: str, cpus: int, shard_size: int) -> dict:
    """One run of no stages (the input phase only), in this process: its figures."""
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.engine.runner import make_runner
    from pipelines.job import build_plan

    config = parse_config(
        {
            "name": "ingest",
            "input": pool,
            "output_dir": out,
            "runner": runner,
            "shard_size": shard_size,
            "ray": {"num_cpus": cpus},
            "stages": [],
        }
    )
    engine = make_runner(runner, config.ray)
    if runner == "ray":
        engine.start()  # Ray's start is not ingest
    plan = build_plan(config)
    start = time.perf_counter()
    try:
        manifest = run_pipeline(plan, engine)
    finally:
        engine.close()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()  # before the check below reads the shards
    run = Path(out) / "ingest"
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted((run / "00_input").glob("*.parquet")):
        digest.update(pq.read_table(path, columns=["uid"])["uid"].to_numpy(zero_copy_only=False).astype(str).tobytes())
    rows = manifest.phases[0].counts["read"].rows_in
    return {
        "seconds": seconds,
        "rows": rows,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": peak,
        "ledger": manifest.phases[0].counts["read"].to_dict(),
        "uids": digest.hexdigest(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: unlike ``ru_maxrss`` it starts again at ``exec``, so
    the parent's pool generation does not count)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(
    pool: str, out: str, runner: str, cpus: int, shard_size: int, script: str = __file__, *extra: str
) -> dict:
    """``script --child ...`` in a fresh process (its peak RSS its own); the JSON it printed last."""
    done = subprocess.run(
        [sys.executable, script, "--child", pool, out, runner, str(cpus), str(shard_size), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"{runner} run on {cpus} CPU(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        pool, out, runner, cpus, shard_size = sys.argv[2:7]
        print(json.dumps(ingest(pool, out, runner, int(cpus), int(shard_size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shard-size", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp, "pool")
        start = time.perf_counter()
        write_pool(pool, args.rows)
        print(
            f"pool: {args.rows:,} rows in {len(list(pool.iterdir()))} files "
            f"({time.perf_counter() - start:.0f} s to write)"
        )
        results = {}
        for name, runner, cpus in (
            ("local runner (the driver alone)", "local", 1),
            ("ray, 1 worker", "ray", 1),
            ("ray, 2 workers", "ray", 2),
        ):
            results[name] = run_child(
                str(pool), str(Path(tmp, name.split(" ")[0] + str(cpus))), runner, cpus, args.shard_size
            )
            r = results[name]
            print(
                f"{name:32s} {r['seconds']:7.1f} s  {r['rows_per_s']:>12,.0f} rows/s  "
                f"{r['rows_per_s'] / cpus:>12,.0f} rows/s per core  driver peak RSS {r['peak_rss_mib']:,.0f} MiB"
            )
        same = {json.dumps([r["ledger"], r["uids"]]) for r in results.values()}
        if len(same) != 1:
            sys.exit("the runs gave different shards")
        print("every run gave the same shards (ledger and uids)")
        ours, baseline = results["ray, 2 workers"]["rows_per_s"], results["ray, 1 worker"]["rows_per_s"]
        print(f"result: ingest ours={ours:,.0f} baseline={baseline:,.0f} ratio={ours / baseline:.2f} rows/s")


if __name__ == "__main__":
    main()
