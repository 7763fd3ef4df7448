"""Hostile images: what one costs to decode in the download stage and in img2dataset's own resizer.

Each case is a small file built here that costs far more to decode than its size or header says
(an animated GIF whose later frame is transparent, a JPEG with thousands of scans, a JPEG whose
header claims 9400 x 9400, a 1 x 1000 strip upscaled), and one heavy file within every limit
that both sides decode in full. Each side decodes each case in a fresh
process, the same bytes with the same resize settings (512 px, keep_ratio, JPEG q95):

- baseline: img2dataset's ``Resizer`` called directly, as img2dataset's downloader calls it
  (and as vlmcurate did before its decoder ran in a child process), stopped after --cap seconds;
- ours: the download stage's decoder (:class:`pipelines.download.decode_process.DecodeProcess`: the
  header check, then img2dataset's resizer in a child process with a memory limit and a deadline).

Peak memory is the largest VmHWM of the process and (ours) its decoder child. The result line
gives the worst case of each side.

    .venv/bin/python benchmarks/hostile_decode.py [--cap 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "gif_6000": ("animated_gif", (6000,), {}),
    "gif_9400": ("animated_gif", (9400,), {}),
    "scans_4096x2000": ("repeated_scans", (4096, 2000), {}),
    "scans_4096x20000": ("repeated_scans", (4096, 20_000), {}),
    "jpeg_claiming_9400": ("jpeg_claiming", (9400, 9400), {}),
    "strip_1x1000_upscaled": ("png", (1, 1000), {"resize_only_if_bigger": False}),
    # Within every limit (95 scans, 88 megapixels): decoded in full on both sides.
    "scans_9400x85": ("repeated_scans", (9400, 85), {}),
}

_CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests import images
from pipelines.stage.decode import DecodeLimits, ImageRejected, ResizeSettings, load_img2dataset_resizer
maker, args, resize = {maker!r}, {args!r}, {resize!r}
body = getattr(images, maker)(*args)
settings = ResizeSettings(**resize)

def peak_mib(pid="self"):
    text = Path(f"/proc/{{pid}}/status").read_text()
    return int(text.split("VmHWM:")[1].split()[0]) / 1024

Path("/proc/self/clear_refs").write_text("5")  # count the decode, not building the input
start = time.perf_counter()
if {side!r} == "baseline":
    resizer = load_img2dataset_resizer().Resizer(image_size=settings.image_size, resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger, encode_format="jpg", encode_quality=95)
    data, width, height, *_, error = resizer(__import__("io").BytesIO(body))
    outcome = f"error: {{error}}" if error else f"kept as {{width}}x{{height}}"
    child = None
else:
    from pipelines.download.decode_process import DecodeProcess
    decoder = DecodeProcess(settings, DecodeLimits(), timeout=10)
    try:
        encoded = decoder(body)
        outcome = f"kept as {{encoded.width}}x{{encoded.height}}"
    except ImageRejected as e:
        outcome = e.reason
    child = decoder._child.process.pid if decoder._child else None
seconds = time.perf_counter() - start
peak = max(peak_mib(), peak_mib(child) if child else 0)
print(json.dumps({{"bytes": len(body), "seconds": seconds, "peak_mib": peak, "outcome": outcome}}))
"""


def measure(side: str, case: str, cap: float) -> dict:
    maker, args, resize = CASES[case]
    script = _CHILD.format(
        root=str(Path(__file__).resolve().parents[1]), maker=maker, args=args, resize=resize, side=side
    )
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return {"seconds": cap, "peak_mib": float("nan"), "outcome": f"still decoding after {cap:g} s (stopped)"}
    if done.returncode != 0:
        return {
            "seconds": time.perf_counter() - start,
            "peak_mib": float("nan"),
            "outcome": f"process died: {done.stderr.strip().splitlines()[-1:]}",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap", type=float, default=120.0, help="seconds before a baseline decode is stopped")
    cap = parser.parse_args().cap
    worst = {"ours": [0.0, 0.0], "baseline": [0.0, 0.0]}
    print(f"{'case':24} {'side':9} {'bytes':>9} {'seconds':>8} {'peak MiB':>9}  outcome")
    for case in CASES:
        for side in ("baseline", "ours"):
            row = measure(side, case, cap)
            print(
                f"{case:24} {side:9} {row.get('bytes', 0):>9,} {row['seconds']:>8.2f} {row['peak_mib']:>9.0f}  "
                f"{row['outcome']}",
                flush=True,
            )
            worst[side][0] = max(worst[side][0], row["seconds"])
            if row["peak_mib"] == row["peak_mib"]:  # not NaN
                worst[side][1] = max(worst[side][1], row["peak_mib"])
    (ours_s, ours_mib), (base_s, base_mib) = worst["ours"], worst["baseline"]
    print(
        f"result: hostile_decode_worst_seconds ours={ours_s:.2f} baseline={base_s:.2f} "
        f"ratio={base_s / ours_s:.0f} s (baseline/ours)"
    )
    print(
        f"result: hostile_decode_worst_peak ours={ours_mib:.0f} baseline={base_mib:.0f} "
        f"ratio={base_mib / ours_mib:.1f} MiB (baseline/ours)"
    )


if __name__ == "__main__":
    main()
