"""Driver memory of whole-pool decisions as the pool grows: exact duplicates at 1M and 10M rows.

A LAION-like parquet pool (urls of 40 to 140 characters, captions of 2 to 40 words) in which
10% of the rows repeat the url and caption of an earlier row is curated by ``ExactDuplicates``
alone, under the Ray runner on 2 CPUs (ours) and under the local runner (everything in one
process, the reference: its kept uids must be the same). Each run is a child process, so its
peak RSS (VmHWM) is the driver's own; CPU seconds are the machine's (driver and Ray workers),
from ``/proc/stat``. The other global stages (MetaCLIP balancing, the CLIP-score cuts, the
near-duplicate stages) still aggregate on the driver and are not measured here yet.

    .venv/bin/python benchmarks/scale.py [--rows 1000000,10000000] [--shard-size 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ingest import FILE_ROWS, ROW_GROUP, WORDS, peak_rss_mib, run_child  # noqa: E402

DUPLICATE_SHARE = 0.10


def write_pool(folder: Path, rows: int, seed: int = 0) -> None:
    """Files of up to 1M rows; a tenth of the rows copy the url and caption of an earlier row."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        ids = np.arange(start, start + n)
        copies = rng.random(n) < DUPLICATE_SHARE
        ids[copies] = rng.integers(0, np.maximum(ids[copies], 1))  # an earlier row (of any file)
        id_text = pa.array(ids.astype(str))
        pads = pa.array(np.array(["x" * k for k in range(100)])[ids % 100])
        url = pc.binary_join_element_wise("https://img.example.com/", pads, "/", id_text, ".jpg", "")
        caption = pc.binary_join_element_wise(
            pa.array(WORDS[ids % len(WORDS)]), pa.array(WORDS[(ids // 7) % len(WORDS)]), "photo", id_text, " "
        )
        pq.write_table(
            pa.table({"url": url, "caption": caption}), folder / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP
        )


def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine so far (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def curate(pool: str, out: str, runner: str, cpus: int, shard_size: int) -> dict:
    """One run of ExactDuplicates over the pool, in this process: its figures."""
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.engine.runner import make_runner
    from pipelines.job import build_plan

    config = parse_config(
        {
            "name": "scale",
            "input": pool,
            "output_dir": out,
            "runner": runner,
            "shard_size": shard_size,
            "ray": {"num_cpus": cpus},
            "stages": [{"stage": "curation.dedup:ExactDuplicates"}],
        }
    )
    engine = make_runner(runner, config.ray)
    if runner == "ray":
        engine.start()
    plan = build_plan(config)
    start, cpu = time.perf_counter(), busy_cpu_seconds()
    try:
        manifest = run_pipeline(plan, engine)
    finally:
        engine.close()
    seconds, cpu_seconds = time.perf_counter() - start, busy_cpu_seconds() - cpu
    peak = peak_rss_mib()
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted((Path(out) / "scale" / manifest.final_phase).glob("*.parquet")):
        digest.update(pq.read_table(path, columns=["uid"])["uid"].to_numpy(zero_copy_only=False).astype(str).tobytes())
    rows = manifest.phases[0].counts["read"].rows_in
    return {
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds_per_row": cpu_seconds / rows,
        "peak_rss_mib": peak,
        "duplicates": manifest.aggregates["exact_duplicates"]["duplicate_rows"],
        "kept": digest.hexdigest(),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        pool, out, runner, cpus, shard_size = sys.argv[2:7]
        print(json.dumps(curate(pool, out, runner, int(cpus), int(shard_size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000", help="pool sizes, comma-separated")
    parser.add_argument("--shard-size", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sizes = [int(s) for s in args.rows.split(",")]
    driver = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            pool = Path(tmp, "pool")
            write_pool(pool, rows)
            results = {
                runner: run_child(str(pool), str(Path(tmp, runner)), runner, 2, args.shard_size, __file__)
                for runner in ("ray", "local")
            }
        if results["ray"]["kept"] != results["local"]["kept"]:
            sys.exit(f"{rows:,} rows: the Ray runner kept other rows than the local runner")
        for runner, r in results.items():
            print(
                f"{rows:>12,} rows  {runner:5s}  {r['seconds']:7.1f} s  {rows / r['seconds']:>10,.0f} rows/s  "
                f"{r['cpu_seconds_per_row'] * 1e6:6.2f} CPU-us/row  driver peak RSS {r['peak_rss_mib']:7,.0f} MiB  "
                f"{r['duplicates']:,} duplicates"
            )
        driver[rows] = results["ray"]["peak_rss_mib"]
    print("the Ray and local runners kept the same rows at every size")
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        ratio = driver[large] / driver[small]
        ours, baseline = driver[large], driver[small]
        print(f"result: scale_driver_memory ours={ours:.0f} baseline={baseline:.0f} ratio={ratio:.2f} MiB")


if __name__ == "__main__":
    main()
