"""CLIP scoring throughput: the project's two stages under the Ray runner vs a bare open_clip loop.

Same real images (../shared/data/flickr8k JPEGs with their first caption), same model, same
batch size, same number of CPU cores, one run:

- baseline: one process, ``torch.set_num_threads(cores)``; per batch, PIL-decode each image,
  ``bundle.preprocess`` it, stack, ``model.encode_image``, tokenize the captions,
  ``model.encode_text``, L2-normalise both, cosine. Model loading is not timed (imports even
  less: they happen before).
- ours: a pipeline ``pipelines.download:Download`` -> ``curation.clip_score:ClipPreprocess`` ->
  ``curation.clip_score:ClipEmbed`` on a local Ray started with ``num_cpus=cores``. The images
  are served on 127.0.0.1 by a separate process. The download phase (which ends its phase, as
  in every real pipeline) runs first and is not timed: the plan is run with its phases cut after
  the download. Then the full plan is run again: it resumes the same run directory, skips the
  input and the download phase, and runs the preprocess+embed phase over every shard. That
  second ``run_pipeline`` call is what is timed: Ray is already up, but the phase's own costs
  are in: reading the downloaded parquet shards, starting the embed actor (a fresh process
  importing torch and open_clip) and loading the model in it, Ray Data's scheduling and object
  transfers, writing the scored shards, rejects and ledger, and the driver's manifest and
  ledger checks.

The baseline reads exactly the bytes the download phase stored (img2dataset's resizer
re-encodes them as JPEG quality 95; Flickr8k's images here are at most 384 px, so none is
resized), in the same order, and both sides' scores must agree (1e-4 on CPU). It runs after
Ray has shut down and its processes have exited. Each round repeats everything (fresh Ray,
download, ours, baseline); the result line gives the medians of the rounds, since a shared
machine's load varies (the 1-min load average is printed around each timed part).

    .venv/bin/python benchmarks/clip_score.py [--model lit-effnet-minilm|tiny-vit|ViT-B-32]
        [--images 800] [--batch-size 64] [--cpus N] [--shard-size 200] [--embed-cpus C]
        [--rounds 3] [--profile FILE] [--baseline-channels-last] [--device cpu|cuda]

The stage hands the model channels-last tensors (its NHWC uint8 pixels are permuted, not
copied), which oneDNN convolutions run faster on a CPU than the contiguous NCHW batches of
``torch.stack``; ``--baseline-channels-last`` gives the baseline the same layout.

``--embed-cpus`` overrides ``resources.cpus`` of the embed stage in the pipeline config (the
stage sets ``torch.set_num_threads`` to it on a CPU; the runner may scale the Ray request down
to fit). ``--profile FILE`` samples CPU seconds per process (driver, Ray daemons, workers)
during each timed run, dumps Ray's timeline to FILE and prints busy seconds per kind of work.
``--device cuda`` runs both sides on the GPU (the stage with fp16 autocast, ``precision:
auto``; the baseline the same) on a Ray with one GPU; ViT-B-32 has random weights (no
network), lit-effnet-minilm its packaged towers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loopback import serve  # noqa: E402
from tests.processes import descendants  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_pairs(count: int) -> list[tuple[bytes, str]]:
    """The first ``count`` Flickr8k images (by file name) with their first caption, repeated if needed."""
    captions = {}
    with open(SHARED / "flickr8k" / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            captions[record["image"]] = record["captions"][0]
    files = [p for p in sorted((SHARED / "flickr8k" / "images").glob("*.jpg")) if p.name in captions]
    pairs = [(p.read_bytes(), captions[p.name]) for p in files[:count]]
    if len(pairs) < count:
        print(f"note: {len(pairs)} captioned images available; repeating them to {count} rows")
    return [pairs[i % len(pairs)] for i in range(count)]


def pipeline_config(pool: str, out: str, args: argparse.Namespace) -> dict:
    embed_resources: dict = {"batch_size": args.batch_size}
    if args.embed_cpus is not None:
        embed_resources["cpus"] = args.embed_cpus
    return {
        "name": "clip-bench",
        "input": pool,
        "output_dir": out,
        "runner": "ray",
        "shard_size": args.shard_size,
        "ray": {"num_cpus": args.cpus, "num_gpus": 1 if args.device == "cuda" else 0},
        "stages": [
            {
                "stage": "pipelines.download:Download",
                "threads": 16,
                "retries": 0,
                "allow_addresses": ["127.0.0.1"],
                "disallowed_header_directives": [],
            },
            {
                "stage": "curation.clip_score:ClipPreprocess",
                "model": args.model,
                "resources": {"batch_size": args.batch_size},
            },
            {
                "stage": "curation.clip_score:ClipEmbed",
                "model": args.model,
                "device": args.device,
                "resources": embed_resources,
            },
        ],
    }


def run_ours(pool: str, out: str, args: argparse.Namespace) -> dict:
    """Download (untimed), then the timed resume that runs preprocess+embed; the scored rows."""
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.engine.runner import RayRunner
    from pipelines.job import build_plan

    config = parse_config(pipeline_config(pool, out, args))
    plan = build_plan(config)
    assert [p.stages[0].name for p in plan.phases] == ["download", "clip_preprocess"], plan.phases
    runner = RayRunner(config.ray)
    try:
        start = time.perf_counter()
        run_pipeline(dataclasses.replace(plan, phases=plan.phases[:1]), runner)  # starts Ray, downloads
        download_s = time.perf_counter() - start
        downloaded = read_phase(plan.run_uri, plan.phases[0].name)
        print(f"download (untimed, Ray start included): {downloaded.num_rows} images in {download_s:.1f} s")

        finished: list[float] = []
        scoring = plan.phases[1].name

        def progress(phase: str, done: int, total: int) -> None:
            if phase == scoring:
                finished.append(time.perf_counter())

        load_before = os.getloadavg()[0]
        sampler = CpuSampler() if args.profile else contextlib.nullcontext()
        with sampler:
            wall_start, start = time.time(), time.perf_counter()
            manifest = run_pipeline(plan, runner, progress)
            seconds = time.perf_counter() - start
        print(
            f"ours: 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
            f"(the machine has {os.cpu_count()} cores; others' processes show here)"
        )
        if args.profile:
            sampler.report(seconds)
            summarise_timeline(args.profile, wall_start, seconds)
    finally:
        runner.close()
    scored = read_phase(plan.run_uri, manifest.final_phase)
    return {
        "seconds": seconds,
        "downloaded": downloaded,
        "scored": scored,
        "shards_done_at": [t - start for t in finished],
    }


def summarise_timeline(path: str, wall_start: float, seconds: float) -> None:
    """Dump Ray's timeline of the timed run to ``path``; print busy seconds per kind of work."""
    import ray

    ray.timeline(filename=path)
    events = [e for e in json.loads(Path(path).read_text()) if e.get("ph") == "X" and e["ts"] / 1e6 >= wall_start - 1]
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        begin = e["ts"] / 1e6 - wall_start
        spans.setdefault(e["name"], []).append((begin, begin + e["dur"] / 1e6))
    print(f"Ray timeline of the timed run ({seconds:.1f} s; {path}): busy s, count, first start, last end")
    for name, items in sorted(spans.items(), key=lambda kv: -sum(b - a for a, b in kv[1])):
        busy = sum(b - a for a, b in items)
        if busy >= 0.05:
            print(
                f"  {name[:90]:90s} {busy:7.1f} s {len(items):4d}x  {min(a for a, _ in items):6.1f} .. "
                f"{max(b for _, b in items):6.1f}"
            )


class CpuSampler:
    """CPU seconds per process of this tree (driver, Ray's daemons and workers), sampled from /proc.

    Processes that exit between samples lose at most one interval; a sample every 0.25 s.
    """

    def __init__(self) -> None:
        import threading

        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        for pid in descendants(os.getpid()) | {os.getpid()}:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            seconds = (int(stat[11]) + int(stat[12])) / self._tick
            self.first.setdefault(pid, seconds)
            self.last[pid] = (name.strip() or self.last.get(pid, ("",))[0], seconds)  # a zombie has no cmdline

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self, seconds: float) -> None:
        groups: dict[str, list[float]] = {}
        for pid, (name, end) in self.last.items():
            label = "this driver (Ray Data executor, run_pipeline)" if pid == os.getpid() else _process_label(name)
            group = groups.setdefault(label, [0.0, 0])
            group[0] += end - self.first[pid]
            group[1] += end > self.first[pid]
        total = sum(cpu for cpu, _ in groups.values())
        print(f"CPU seconds during the timed run ({seconds:.1f} s wall, {total:.1f} CPU s in all):")
        for label, (cpu, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            if cpu >= 0.05:
                print(f"  {cpu:6.1f} s  {label} ({count} process{'es' if count != 1 else ''})")


def _process_label(cmdline: str) -> str:
    if cmdline.startswith(("ray::IDLE", "ray::MapBatches")):
        return "Ray task workers (load+preprocess, finish)"
    if cmdline.startswith("ray::MapWorker"):
        return "Ray actor of the embed stage"
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py", "http_server"):
        if daemon in cmdline:
            return f"Ray daemon: {daemon}"
    if "default_worker.py" in cmdline:
        return "Ray worker (starting)"
    return cmdline[:60] or "?"


def wait_for_ray_exit(keep: set[int], limit: float = 30.0) -> None:
    """After ``ray.shutdown``, wait until its processes are gone so the baseline runs alone."""
    deadline = time.monotonic() + limit
    while descendants(os.getpid()) - keep and time.monotonic() < deadline:
        time.sleep(0.2)
    left = descendants(os.getpid()) - keep
    if left:
        print(f"note: {len(left)} Ray process(es) still alive {limit:.0f} s after shutdown")
    time.sleep(2.0)


def read_phase(run_uri: str, phase: str) -> pa.Table:
    files = sorted(Path(run_uri, phase).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("source_index")


def run_baseline(bodies: list[bytes], captions: list[str], args: argparse.Namespace) -> dict:
    """The bare open_clip loop; model loading is timed separately and not counted."""
    import torch
    from PIL import Image

    from models.clip import load_clip

    torch.set_num_threads(args.cpus)
    start = time.perf_counter()
    bundle = load_clip(args.model, device=args.device)
    load_s = time.perf_counter() - start
    model, device = bundle.model, torch.device(args.device)
    autocast = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")
    scores = []
    load_before = os.getloadavg()[0]
    cpu_start, start = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for offset in range(0, len(bodies), args.batch_size):
            images = [Image.open(io.BytesIO(b)) for b in bodies[offset : offset + args.batch_size]]
            pixels = torch.stack([bundle.preprocess(image) for image in images]).to(device)
            if args.baseline_channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            tokens = bundle.tokenizer(captions[offset : offset + args.batch_size]).to(device)
            with torch.autocast(**autocast):
                image_emb = model.encode_image(pixels)
                text_emb = model.encode_text(tokens)
            image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
            text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
            scores.append((image_emb * text_emb).sum(-1).cpu().numpy())
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"baseline: 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return {"seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "scores": np.concatenate(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="lit-effnet-minilm",
        help="lit-effnet-minilm (real towers), tiny-vit, or an open_clip architecture (ViT-B-32: random weights)",
    )
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--cpus",
        type=int,
        default=os.cpu_count(),
        help="cores for both sides: torch threads of the baseline, num_cpus of Ray",
    )
    parser.add_argument("--shard-size", type=int, default=200, help="pipeline shard size (rows)")
    parser.add_argument(
        "--embed-cpus",
        type=float,
        default=None,
        help="override resources.cpus of the ClipEmbed stage (default: the stage's own, 1)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="sample CPU seconds per process during the timed run, write Ray's timeline of "
        "it to FILE and summarise both (the sampler costs a little CPU itself)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeat both sides (fresh Ray, download, ours, baseline); medians are reported",
    )
    parser.add_argument(
        "--baseline-channels-last",
        action="store_true",
        help="convert the baseline's batches to channels-last memory, as the stage's pixels "
        "already are (its NHWC uint8 pixels are permuted, not copied)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if not (SHARED / "flickr8k" / "images").exists():
        print(f"skipped: {SHARED / 'flickr8k'} not found (clone the project beside ../shared)")
        return
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    pairs = load_pairs(args.images)
    n = len(pairs)
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=([b for b, _ in pairs], ports), daemon=True)
    server.start()
    port = ports.get(timeout=30)
    print(
        f"{n} Flickr8k images, model {args.model}, batch {args.batch_size}, {args.cpus} cores, "
        f"device {args.device}, shard size {args.shard_size}, embed cpus {args.embed_cpus or 'stage default'}, "
        f"{args.rounds} round(s)"
    )
    ours_rates, base_rates = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pool = os.path.join(tmp, "pool.parquet")
            pq.write_table(
                pa.table(
                    {"url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(n)], "caption": [c for _, c in pairs]}
                ),
                pool,
            )
            for round_ in range(args.rounds):
                print(f"-- round {round_ + 1}/{args.rounds}")
                ours = run_ours(pool, os.path.join(tmp, f"runs-{round_}"), args)
                wait_for_ray_exit(keep={server.pid})
                base = check_and_run_baseline(ours, n, args)
                ours_rates.append(n / ours["seconds"])
                base_rates.append(n / base["seconds"])
                print(
                    f"round {round_ + 1}: ours {ours_rates[-1]:.2f}, baseline {base_rates[-1]:.2f} images/s, "
                    f"ratio {ours_rates[-1] / base_rates[-1]:.2f}"
                )
    finally:
        server.terminate()
    ours_rate, base_rate = float(np.median(ours_rates)), float(np.median(base_rates))
    if args.rounds > 1:
        print(
            f"medians over {args.rounds} rounds: ours {ours_rate:.2f} images/s "
            f"({', '.join(f'{r:.2f}' for r in ours_rates)}), baseline {base_rate:.2f} images/s "
            f"({', '.join(f'{r:.2f}' for r in base_rates)})"
        )
    print(
        f"result: clip_score ours={ours_rate:.2f} baseline={base_rate:.2f} ratio={ours_rate / base_rate:.2f} images/s"
    )


def check_and_run_baseline(ours: dict, n: int, args: argparse.Namespace) -> dict:
    """The baseline over the bytes the download phase stored; both sides' scores must agree."""
    downloaded, scored = ours["downloaded"], ours["scored"]
    if downloaded.num_rows != n or scored.num_rows != n:
        sys.exit(f"FAILED: {n} images, {downloaded.num_rows} downloaded, {scored.num_rows} scored")
    base = run_baseline(downloaded["image"].to_pylist(), downloaded["caption"].to_pylist(), args)
    ours_scores = scored["clip_score"].to_numpy()
    gap = float(np.abs(ours_scores - base["scores"]).max())
    tolerance = 1e-2 if args.device == "cuda" else 1e-4
    print(f"scores: max |ours - baseline| = {gap:.2e} over {n} images (mean score {ours_scores.mean():.4f})")
    if gap > tolerance:
        sys.exit(f"FAILED: scores differ by {gap} (> {tolerance})")
    layout = ", channels-last batches" if args.baseline_channels_last else ""
    print(
        f"baseline (bare open_clip loop, {args.cpus} torch threads{layout}): {n} images in {base['seconds']:.1f} s = "
        f"{n / base['seconds']:.2f} images/s ({1000 * base['seconds'] / n:.1f} ms/image; process CPU "
        f"{base['cpu_s']:.1f} s; model load {base['load_s']:.1f} s, not timed)"
    )
    done = ours["shards_done_at"]
    print(
        f"ours (Ray runner, {args.cpus} CPUs, whole preprocess+embed phase): {n} images in {ours['seconds']:.1f} s = "
        f"{n / ours['seconds']:.2f} images/s ({1000 * ours['seconds'] / n:.1f} ms/image); driver saw shards at "
        f"{', '.join(f'{t:.1f}' for t in done)} s"
    )
    return base


if __name__ == "__main__":
    main()
