"""Driver memory of every whole-pool decision as the pool grows: all global stages at 1M and 10M rows.

A LAION-like parquet pool is curated by every kind of whole-pool decision in one run:
``ExactDuplicates`` (a keyed reduction), ``MetaclipMatch`` + ``MetaclipBalance`` (a sum by
key), ``CaptionNearDuplicates`` (LSH buckets reduced into edges, clustered in one task),
``SyntheticClip`` (a stand-in for CLIP: :mod:`benchmarks.scale_stages`), ``ClipScoreNullCut``
(whole shards counted), ``ClipScoreTopFraction`` (counting passes) and ``ImageNearDuplicates``
(k-means cells). The pool: captions of 4 to 16 words drawn from a Zipf law over 20,000
pseudo-words; 10% of the rows repeat the url and caption of an earlier row, 5% take an earlier
row's caption with one word changed (near-duplicate captions), 5% an earlier row's image
slightly changed (near-duplicate images), and one pair in five is mismatched.

Ours: the Ray runner on a 2-node Ray cluster started on this machine (``ray.cluster_utils``, one
CPU and a 4 GiB object store a node, spilling to disk beyond). The reference: the local runner
(everything in one process), up to ``--reference-rows``, whose kept uids must be the same.
Each run is a child process, so its peak RSS (VmHWM) is the driver's own; CPU seconds are the
machine's (driver, nodes and workers), from ``/proc/stat``; wall seconds by phase and pass.

    .venv/bin/python benchmarks/scale.py [--rows 1000000,10000000] [--shard-size 100000] [--dim 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import FILE_ROWS, ROW_GROUP, peak_rss_mib, run_child  # noqa: E402

EXACT_SHARE, CAPTION_COPY_SHARE, IMAGE_COPY_SHARE = 0.10, 0.05, 0.05
VOCABULARY = 20_000
#: MetaCLIP's threshold was 20,000 for 400M pairs and 500k entries; for 2,000 entries the same
#: matches per entry come at one in 100 rows.
METACLIP_ROWS_PER_THRESHOLD = 100
#: Each node's object store: Ray Data spills the shuffles to disk beyond it.
OBJECT_STORE = 4 << 30


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 of each value: a well spread, reproducible 64-bit draw."""
    h = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def vocabulary() -> np.ndarray:
    """20,000 distinct pseudo-words of 2 to 4 syllables, most frequent first."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    rng = np.random.default_rng(7)
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        words["".join(rng.choice(syllables, rng.integers(2, 5)))] = None
    return np.array(list(words))


def captions(caption_ids: np.ndarray, edits: np.ndarray, words: np.ndarray) -> pa.Array:
    """Caption ``caption_ids[i]`` (4 to 16 Zipf-drawn words, a function of the id), its first word
    replaced by one drawn from ``edits[i]`` where that is not negative."""
    cdf = np.cumsum(1.0 / (np.arange(len(words)) + 10.0))
    cdf /= cdf[-1]
    lengths = (4 + _mix(caption_ids * 7 + 1) % np.uint64(13)).astype(np.int64)
    row = np.repeat(np.arange(len(caption_ids)), lengths)
    position = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    draw = _mix(caption_ids[row] * 64 + position).astype(np.float64) / 2.0**64
    edited = (position == 0) & (edits[row] >= 0)
    draw[edited] = _mix(edits[row][edited] * 64 + 63).astype(np.float64) / 2.0**64
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    chosen = pa.array(words.tolist()).take(pa.array(np.searchsorted(cdf, draw)))
    lists = pa.ListArray.from_arrays(pa.array(offsets), chosen)
    return pc.binary_join(lists, " ")


def write_pool(folder: Path, rows: int, seed: int = 0) -> Path:
    """The pool's parquet files (1M rows each) and, beside them, the MetaCLIP metadata; its path."""
    rng = np.random.default_rng(seed)
    words = vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        ids = np.arange(start, start + n)
        earlier = rng.integers(0, np.maximum(ids, 1))
        kind = np.searchsorted(np.cumsum([EXACT_SHARE, CAPTION_COPY_SHARE, IMAGE_COPY_SHARE]), rng.random(n))
        exact, caption_copy, image_copy = kind == 0, kind == 1, kind == 2
        image_ids = np.where(exact | image_copy, earlier, ids)
        caption_ids = np.where(exact | caption_copy, earlier, ids)
        edits = np.where(caption_copy, ids, -1)
        pads = pa.array(np.array(["x" * k for k in range(100)])[image_ids % 100])
        suffix = pa.array(np.where(image_copy, np.char.add("?copy=", ids.astype(str)), ""))
        url = pc.binary_join_element_wise(
            "https://img.example.com/", pads, "/", pa.array(image_ids.astype(str)), ".jpg", suffix, ""
        )
        table = pa.table({"url": url, "caption": captions(caption_ids, edits, words)})
        pq.write_table(table, folder / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP)
    metadata = folder.parent / "metadata.json"
    metadata.write_text(json.dumps(words[::10].tolist()))  # 2,000 entries from head to tail
    return metadata


def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine so far (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def stages(metadata: str, rows: int, dim: int) -> list[dict]:
    return [
        {"stage": "curation.dedup:ExactDuplicates"},
        {"stage": "curation.metaclip:MetaclipMatch", "metadata": metadata, "case_sensitive": False},
        {
            "stage": "curation.metaclip:MetaclipBalance",
            "threshold": max(1, rows // METACLIP_ROWS_PER_THRESHOLD),
            "tail_share": None,
        },
        {"stage": "curation.dedup:CaptionNearDuplicates"},
        {"stage": "benchmarks.scale_stages:SyntheticClip", "dim": dim},
        {"stage": "curation.clip_score_null:ClipScoreNullCut"},
        {"stage": "curation.clip_score:ClipScoreTopFraction", "fraction": 0.9},
        {"stage": "curation.dedup:ImageNearDuplicates"},
    ]


def time_steps(engine) -> dict[str, float]:
    """Wall seconds the runner spends on each phase and on each whole-pool pass, by name, as it
    goes (its methods wrapped in place)."""
    seconds: dict[str, float] = defaultdict(float)
    run_phase, sum_by_key, reduce_by_key, run_task = (
        engine.run_phase,
        engine.sum_by_key,
        engine.reduce_by_key,
        engine.run_task,
    )

    def timed(name: str, start: float) -> None:
        seconds[name] += time.perf_counter() - start

    def phase(task, shards):
        start = time.perf_counter()
        yield from run_phase(task, shards)
        timed(f"phase {task.name}", start)

    def summed(source, counts):
        start = time.perf_counter()
        try:
            return sum_by_key(source, counts)
        finally:
            timed(f"sums of {counts.func.__self__.name}", start)

    def reduced(job):
        start = time.perf_counter()
        try:
            return reduce_by_key(job)
        finally:
            timed(f"reduction into {job.out}", start)

    def task(fn, arg, memory):
        start = time.perf_counter()
        try:
            return run_task(fn, arg, memory)
        finally:
            timed(f"task {getattr(fn, '__name__', None) or fn.func.__name__}", start)

    engine.run_phase, engine.sum_by_key, engine.reduce_by_key, engine.run_task = phase, summed, reduced, task
    return seconds


def curate(pool: str, out: str, runner: str, cpus: int, shard_size: int, dim: int) -> dict:
    """One run of every global stage over the pool, driven from this process: its figures."""
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.engine.runner import make_runner
    from pipelines.job import build_plan

    cluster = None
    ray_config: dict = {"num_cpus": cpus}
    if runner == "ray":
        from ray.cluster_utils import Cluster

        os.environ["PYTHONPATH"] = str(ROOT)  # the nodes' workers import benchmarks.scale_stages
        node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        for _ in range(cpus - 1):
            cluster.add_node(**node)
        ray_config = {"address": cluster.address}
    metadata = str(Path(pool).parent / "metadata.json")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(pool).glob("*.parquet"))
    config = parse_config(
        {
            "name": "scale",
            "input": pool,
            "output_dir": out,
            "runner": runner,
            "shard_size": shard_size,
            "ray": ray_config,
            "stages": stages(metadata, rows, dim),
        }
    )
    engine = make_runner(runner, config.ray)
    if runner == "ray":
        engine.start()
    seconds_by_step = time_steps(engine)
    plan = build_plan(config)
    start, cpu = time.perf_counter(), busy_cpu_seconds()
    try:
        manifest = run_pipeline(plan, engine)
    finally:
        engine.close()
        if cluster is not None:
            cluster.shutdown()
    seconds, cpu_seconds = time.perf_counter() - start, busy_cpu_seconds() - cpu
    peak = peak_rss_mib()
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted((Path(out) / "scale" / manifest.final_phase).glob("*.parquet")):
        digest.update(pq.read_table(path, columns=["uid"])["uid"].to_numpy(zero_copy_only=False).astype(str).tobytes())
    totals = manifest.stage_totals()
    return {
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds_per_row": cpu_seconds / rows,
        "peak_rss_mib": peak,
        "rejected": {name: sum(t.rejected.values()) for name, t in totals.items() if t.rejected},
        "kept_rows": manifest.phases[-1].rows_out,
        "seconds_by_step": dict(seconds_by_step),
        "kept": digest.hexdigest(),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        pool, out, runner, cpus, shard_size, dim = sys.argv[2:8]
        print(json.dumps(curate(pool, out, runner, int(cpus), int(shard_size), int(dim))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000", help="pool sizes, comma-separated")
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=32, help="embedding width of the CLIP stand-in")
    parser.add_argument("--reference-rows", type=int, default=1_000_000, help="largest pool run locally too")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sizes = [int(s) for s in args.rows.split(",")]
    figures = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            pool = Path(tmp, "pool")
            write_pool(pool, rows)
            runners = ("ray", "local") if rows <= args.reference_rows else ("ray",)
            results = {
                runner: run_child(
                    str(pool), str(Path(tmp, runner)), runner, 2, args.shard_size, __file__, str(args.dim)
                )
                for runner in runners
            }
        if "local" in results and results["ray"]["kept"] != results["local"]["kept"]:
            sys.exit(f"{rows:,} rows: the Ray runner kept other rows than the local runner")
        for runner, r in results.items():
            print(
                f"{rows:>12,} rows  {runner:5s}  {r['seconds']:7.1f} s  {rows / r['seconds']:>9,.0f} rows/s  "
                f"{r['cpu_seconds_per_row'] * 1e6:6.1f} CPU-us/row  driver peak RSS {r['peak_rss_mib']:7,.0f} MiB  "
                f"{r['kept_rows']:,} kept"
            )
        print(f"{'':>12}  rejected by stage: {json.dumps(results['ray']['rejected'])}")
        steps = results["ray"]["seconds_by_step"]
        print(f"{'':>12}  seconds by step (ray): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
        figures[rows] = results["ray"]
    print(f"the Ray and local runners kept the same rows at every size up to {args.reference_rows:,}")
    if len(sizes) > 1:
        small, large = figures[min(sizes)], figures[max(sizes)]
        cpu_ratio = large["cpu_seconds_per_row"] / small["cpu_seconds_per_row"]
        print(f"CPU-seconds per row, largest over smallest pool: {cpu_ratio:.2f}")
        ours, baseline = large["peak_rss_mib"], small["peak_rss_mib"]
        print(f"result: scale_driver_memory ours={ours:.0f} baseline={baseline:.0f} ratio={ours / baseline:.2f} MiB")


if __name__ == "__main__":
    main()
