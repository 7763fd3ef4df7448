"""The download stage against a hostile loopback server: each case ends in its exact reason."""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pytest
from PIL import Image

from pipelines.download.stage import Download
from tests.http_server import ImageServer, make_image

TIMEOUT, RETRIES, BACKOFF = 1.0, 1, 0.05


class VirtualTime:
    """A clock and a sleep for a fetcher's retry loop: waits are recorded and pass at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def server():
    server = ImageServer()
    server.add("ok.jpg", make_image(320, 240))
    server.add("ok.png", make_image(200, 150, "PNG", seed=1))
    server.add("ok.gif", make_image(100, 80, "GIF", seed=2))
    server.add("ok.webp", make_image(120, 90, "WEBP", seed=3))
    server.add("tiny.jpg", make_image(12, 12))
    yield server
    server.close()


@pytest.fixture(scope="module")
def stage():
    stage = Download(
        timeout=TIMEOUT,
        retries=RETRIES,
        backoff=BACKOFF,
        max_retry_after=5,
        max_bytes=200_000,
        allow_addresses=["127.0.0.1"],
        threads=8,
        min_image_size=16,
        image_size=256,
    )
    stage.setup()
    return stage


def run(stage: Download, urls: list[str]) -> list[dict]:
    out = stage(pa.table({"url": pa.array(urls, pa.string())}))
    rows = out.to_pylist()
    return [
        {**row, "_reject_reason": row.get("_reject_reason"), "_reject_detail": row.get("_reject_detail")}
        for row in rows
    ]


def reason(stage, url) -> str | None:
    return run(stage, [url])[0]["_reject_reason"]


@pytest.mark.parametrize(
    "name, size", [("ok.jpg", (320, 240)), ("ok.png", (200, 150)), ("ok.gif", (100, 80)), ("ok.webp", (120, 90))]
)
def test_images_are_downloaded_resized_and_hashed(server, stage, name, size):
    [row] = run(stage, [server.url(f"/img/{name}")])
    assert row["_reject_reason"] is None
    assert (row["original_width"], row["original_height"]) == size
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.format == "JPEG" and stored.size == (row["width"], row["height"])
    assert min(row["width"], row["height"]) == min(256, min(size))  # keep_ratio, only if bigger
    assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/status/404", "http_404"),
        ("/status/403", "http_403"),
        ("/status/410", "http_410"),
        ("/html", "not_an_image"),
        ("/empty", "not_an_image"),
        ("/truncated/ok.jpg", "decode_error"),
        ("/truncated/ok.png", "decode_error"),
        ("/bomb.png", "decompression_bomb"),
        ("/img/tiny.jpg", "too_small"),
        ("/endless", "too_large"),
        ("/declared-huge", "too_large"),
        ("/bytes/300000", "too_large"),
        ("/loop/a", "too_many_redirects"),
        ("/chain/9/ok.jpg", "too_many_redirects"),
        ("/robots/noai/ok.jpg", "opt_out"),
        ("/robots/noimageai/ok.jpg", "opt_out"),
        ("/robots/noindex/ok.jpg", "opt_out"),
        ("/robots/noimageindex/ok.jpg", "opt_out"),
        ("/robots/listed/ok.jpg", "opt_out"),
        ("/robots/ours/ok.jpg", "opt_out"),
        ("/robots/ours-upper/ok.jpg", "opt_out"),
        ("/robots/second-header/ok.jpg", "opt_out"),
        ("/robots/other-agent/ok.jpg", None),
        ("/robots/harmless/ok.jpg", None),
        ("/chain/3/ok.jpg", None),
    ],
)
def test_each_failure_has_its_reason(server, stage, path, expected):
    assert reason(stage, server.url(path)) == expected


def test_a_client_error_is_not_retried(server, stage):
    url = server.url("/status/404?once")
    assert reason(stage, url) == "http_404"
    assert server.requests["/status/404?once"] == 1


def test_server_errors_are_retried_then_succeed_or_give_up(server, stage):
    assert reason(stage, server.url("/flaky/1/ok.jpg")) is None
    assert server.requests["/flaky/1/ok.jpg"] == 2
    assert reason(stage, server.url("/status/503")) == "http_503"
    assert server.requests["/status/503"] == RETRIES + 1


def test_retry_after_is_honoured_and_a_long_one_gives_up(server, stage, monkeypatch):
    waits = []
    monkeypatch.setattr(stage._fetcher, "sleep", waits.append)  # the waits asked for, not spent
    assert reason(stage, server.url("/ratelimit/1/1/ok.jpg")) is None
    assert waits == [1] and server.requests["/ratelimit/1/1/ok.jpg"] == 2  # the server's 1 s, not a backoff
    assert reason(stage, server.url("/ratelimit/3600/1/ok.jpg")) == "http_429"
    assert server.requests["/ratelimit/3600/1/ok.jpg"] == 1  # no retry: the wait exceeds max_retry_after
    assert waits == [1]  # nor a wait for it


@pytest.mark.parametrize("path", ["/drip/ok.jpg", "/slow-headers"])
def test_slow_servers_time_out_at_the_deadline(server, stage, path):
    start = time.monotonic()
    assert reason(stage, server.url(path)) == "timeout"  # waited out, the drip is an image, the headers an empty 200
    assert time.monotonic() - start < 60  # the drip takes over an hour: only a missed deadline gets here this late


def test_an_unknown_host_is_a_dns_failure(stage, monkeypatch):
    import socket

    looked_up = []

    def getaddrinfo(host, *args):  # the answer the system resolver gives a name that does not exist
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    waits = []
    monkeypatch.setattr(stage._fetcher, "sleep", waits.append)
    [row] = run(stage, ["http://no-such-host.invalid/a.jpg"])
    assert row["_reject_reason"] == "dns" and "no-such-host.invalid" in row["_reject_detail"]
    assert looked_up == ["no-such-host.invalid"] and waits == []  # a name that does not exist is not retried


def test_a_short_body_is_a_connection_failure(server, stage):
    [row] = run(stage, [server.url("/short/ok.jpg")])
    assert row["_reject_reason"] == "connection" and "of" in row["_reject_detail"]


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/img/ok.jpg",
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706434:{port}/img/ok.jpg",
        "http://0x7f000002:{port}/img/ok.jpg",
        "http://[::ffff:127.0.0.2]:{port}/img/ok.jpg",
    ],
)
def test_redirects_to_private_addresses_are_refused_before_connecting(server, stage, target, monkeypatch):
    from tests.pipelines.download.sockets import record_connections

    url = server.url("/redirect?to=" + target.format(port=server.port))
    connections, waits = record_connections(monkeypatch), []
    monkeypatch.setattr(stage._fetcher, "sleep", waits.append)
    [row] = run(stage, [url])
    assert row["_reject_reason"] == "blocked_address", row["_reject_detail"]
    assert connections == [("127.0.0.1", server.port)]  # the redirecting server's only: the target never connected
    assert waits == []  # and no retry


def test_a_batch_mixes_successes_and_failures_in_input_order(server, stage):
    urls = [server.url("/img/ok.jpg"), server.url("/status/404"), server.url("/img/ok.png"), "file:///etc/passwd"]
    rows = run(stage, urls)
    assert [r["_reject_reason"] for r in rows] == [None, "http_404", None, "bad_url"]
    assert rows[1]["image"] is None and rows[0]["image"] is not None


def test_parameters_are_validated():
    for bad, message in (
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"encode_format": "gif"}, "encode_format"),
        ({"threads": 0}, "threads"),
        ({"allow_addresses": ["localhost"]}, "allow_addresses"),
    ):
        with pytest.raises(ValueError, match=message):
            Download(**bad)


def test_hostile_pool_through_both_runners_closes_the_ledger_with_identical_reasons(server, tmp_path, runner_factory):
    from pipelines.engine.config import parse_config
    from pipelines.engine.execute import run_pipeline
    from pipelines.job import build_plan
    from tests.conftest import read_phase, read_rejects

    expected = {
        "/img/ok.jpg": None,
        "/img/ok.png": None,
        "/status/404": "http_404",
        "/html": "not_an_image",
        "/empty": "not_an_image",
        "/truncated/ok.jpg": "decode_error",
        "/bomb.png": "decompression_bomb",
        "/endless": "too_large",
        "/loop/a": "too_many_redirects",
        "/robots/noai/ok.jpg": "opt_out",
        "/robots/other-agent/ok.jpg": None,
        "/redirect?to=http://10.0.0.1/x.jpg": "blocked_address",
    }
    pool = tmp_path / "pool.csv"
    pool.write_text("url,caption\n" + "".join(f"{server.url(p)},a test picture {i}\n" for i, p in enumerate(expected)))
    results = {}
    for kind in ("local", "ray"):
        config = {
            "name": kind,
            "input": str(pool),
            "output_dir": str(tmp_path / "runs"),
            "shard_size": 5,
            "stages": [
                {
                    "stage": "pipelines.download:Download",
                    "allow_addresses": ["127.0.0.1"],
                    "timeout": TIMEOUT,
                    "retries": 0,
                    "max_bytes": 200_000,
                    "threads": 4,
                }
            ],
        }
        plan = build_plan(parse_config(config))
        manifest = run_pipeline(plan, runner_factory(kind))
        counts = manifest.stage_totals()["download"]
        assert counts.closes and counts.rows_in == len(expected)
        rejects = read_rejects(plan.run_uri)
        kept = read_phase(plan.run_uri, "01_download")
        reasons = {url: None for url in kept["url"].to_pylist()}
        reasons |= dict(zip(rejects["url"].to_pylist(), rejects["reason"].to_pylist()))
        results[kind] = reasons
    assert results["local"] == results["ray"] == {server.url(p): r for p, r in expected.items()}


def test_non_ascii_paths_and_redirects_are_encoded(server, stage):
    server.add("café.jpg", make_image(64, 48))
    assert reason(stage, server.url("/img/café.jpg")) is None
    assert reason(stage, server.url("/redirect?to=/img/caf%C3%A9.jpg")) is None
    assert reason(stage, server.url("/img/with space.jpg")) == "http_404"  # encoded, asked, not found


def test_a_non_http_answer_is_a_protocol_error_and_not_retried(server, stage):
    assert reason(stage, server.url("/garbage")) == "protocol_error"
    assert server.requests["/garbage"] == 1


def test_the_total_budget_bounds_retries_and_waits(server):
    stage = Download(
        timeout=10,
        total_timeout=25,
        retries=5,
        backoff=0.05,
        max_retry_after=30,
        allow_addresses=["127.0.0.1"],
        threads=2,
    )
    stage.setup()
    virtual = VirtualTime()
    stage._fetcher.clock, stage._fetcher.sleep = virtual.clock, virtual.sleep
    assert reason(stage, server.url("/ratelimit/10/9/ok.jpg")) == "http_429"
    assert virtual.waits == [10, 10]  # the server's Retry-After each time; a third wait would end past the 25 s
    assert server.requests["/ratelimit/10/9/ok.jpg"] == 3  # where retries=5 would have allowed 6


def test_an_rgba_image_that_would_need_gigabytes_to_decode_is_a_bomb(server, stage):
    from tests.http_server import bomb_png

    server.add("rgba.png", bomb_png(9400, 9400, color_type=6, bit_depth=8))  # under max_pixels
    [row] = run(stage, [server.url("/img/rgba.png")])
    assert row["_reject_reason"] == "decompression_bomb" and "GiB" in row["_reject_detail"]


def test_bytes_after_the_end_marker_are_not_truncation(server, stage):
    server.add("trailer.png", make_image(40, 30, "PNG") + b"\x00" * 2048)
    server.add("trailer.gif", make_image(40, 30, "GIF") + b"\r\n")
    assert reason(stage, server.url("/img/trailer.png")) is None
    assert reason(stage, server.url("/img/trailer.gif")) is None


def test_one_failing_row_never_fails_its_batch(server, stage, monkeypatch):
    original = stage._reencode

    def flaky(body):
        if len(body) == len(server.images["ok.png"]):
            raise RuntimeError("a decoder bug")
        return original(body)

    monkeypatch.setattr(stage, "_reencode", flaky)
    rows = run(stage, [server.url("/img/ok.jpg"), server.url("/img/ok.png")])
    assert rows[0]["_reject_reason"] is None
    assert rows[1]["_reject_reason"] == "internal_error" and "a decoder bug" in rows[1]["_reject_detail"]


def test_file_descriptors_do_not_pile_up(server, stage):
    import os

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        run(stage, [server.url(p) for p in ("/img/ok.jpg", "/status/404", "/html", "/short/ok.jpg")] * 10)
    assert len(os.listdir("/proc/self/fd")) - before < 10


def test_a_refused_address_never_sees_a_connection(server, stage):
    from tests.pipelines.download.sockets import silent_server

    listener, port, _ = silent_server("127.0.0.2", accept=False)
    for target in (f"http://127.0.0.2:{port}/x.jpg", f"http://2130706434:{port}/x.jpg"):
        assert reason(stage, server.url("/redirect?to=" + target)) == "blocked_address"
        assert reason(stage, target) == "blocked_address"
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # its queue is empty: a connection made would be waiting there
        listener.accept()
    listener.close()


def test_real_photos_and_clip_art_download_at_their_sizes(server, stage):
    from tests.conftest import shared_path

    photos = sorted(shared_path("flickr8k", "images").glob("*.jpg"))[:6]
    import tarfile

    with tarfile.open(shared_path("tuxpaint", "stamps.tar")) as tar:
        stamps = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".png")][:6]
        clip_art = [(m.name.replace("/", "_"), tar.extractfile(m).read()) for m in stamps]
    urls, sizes = [], []
    for name, data in [(p.name, p.read_bytes()) for p in photos] + clip_art:
        urls.append(server.add(name, data))
        sizes.append(Image.open(io.BytesIO(data)).size)
    rows = run(stage, urls)
    assert [r["_reject_reason"] for r in rows] == [None] * len(urls)
    assert [(r["original_width"], r["original_height"]) for r in rows] == sizes


def test_images_that_cost_more_to_decode_than_their_header_says_cost_only_their_row(server, stage):
    from tests.images import animated_gif, jpeg_claiming, repeated_scans

    urls = [
        server.add("frames.gif", animated_gif(6000)),
        server.url("/img/ok.jpg"),
        server.add("scans.jpg", repeated_scans(2048, 5000)),
        server.add("liar.jpg", jpeg_claiming(9400, 9400)),
        server.url("/img/ok.png"),
    ]
    rows = run(stage, urls)
    assert [r["_reject_reason"] for r in rows] == [
        "decompression_bomb",
        None,
        "decompression_bomb",
        "decode_error",
        None,
    ]
    assert "JPEG scans" in rows[2]["_reject_detail"] and "blocks" in rows[3]["_reject_detail"]


def test_an_upscale_is_priced_by_the_image_it_would_make(server):
    from tests.images import png

    stage = Download(
        resize_only_if_bigger=False,
        image_size=512,
        max_decode_bytes=50 * 1024**2,
        allow_addresses=["127.0.0.1"],
        threads=2,
    )
    stage.setup()
    [strip, photo] = run(stage, [server.add("strip.png", png(1, 1000)), server.url("/img/ok.jpg")])
    assert strip["_reject_reason"] == "decompression_bomb" and "512x512000" in strip["_reject_detail"]
    assert photo["_reject_reason"] is None and min(photo["width"], photo["height"]) == 512


def test_a_decode_that_runs_past_its_deadline_costs_only_its_row(server):
    from tests.images import repeated_scans

    stage = Download(decode_timeout=1, max_jpeg_scans=10**6, allow_addresses=["127.0.0.1"], threads=2)
    stage.setup()
    start = time.monotonic()
    rows = run(stage, [server.add("slow-scans.jpg", repeated_scans(4096, 20_000)), server.url("/img/ok.jpg")])
    assert time.monotonic() - start < 60  # decoding it whole takes minutes
    assert [r["_reject_reason"] for r in rows] == ["decode_timeout", None]


def test_malformed_headers_and_redirects_get_their_true_reason(server, stage):
    assert reason(stage, server.url("/redirect?to=http://[::1")) == "bad_url"
    rows = run(
        stage,
        [server.url("/headers/503/-?Retry-After=%C2%B2"), server.url("/headers/200/ok.jpg?Content-Length=%C2%B2")],
    )
    assert rows[0]["_reject_reason"] == "http_503"  # a non-ASCII digit is no Retry-After: retried as a 503
    assert server.requests["/headers/503/-?Retry-After=%C2%B2"] == RETRIES + 1
    assert rows[1]["_reject_reason"] is None  # an unreadable Content-Length is ignored, the body read to its end


def test_bodies_in_flight_stay_within_their_byte_budget_and_all_complete(server):
    big = make_image(900, 700, seed=5)  # about 150 KB each
    stage = Download(max_bytes_in_flight=len(big), allow_addresses=["127.0.0.1"], threads=8)
    stage.setup()
    held = []
    original = stage._reencode

    def reencode(body):
        held.append(stage._bodies.used)
        return original(body)

    stage._reencode = reencode
    rows = run(stage, [server.add(f"big{i}.jpg", big) for i in range(12)])
    assert all(r["_reject_reason"] is None for r in rows)
    assert max(held) <= 2 * len(big)  # the budget and the one body that may always grow


_HOSTILE_POOL_SCRIPT = """
import pyarrow as pa
from pipelines.download.stage import Download
from tests.http_server import ImageServer, make_image
from tests.images import animated_gif, jpeg_claiming, repeated_scans

def peak_mib(pid="self"):
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024

server = ImageServer()
urls = [server.add("frames.gif", animated_gif(9400)), server.add("scans.jpg", repeated_scans(4096, 20_000)),
        server.add("liar.jpg", jpeg_claiming(9400, 9400))]
urls += [server.add(f"ok{i}.jpg", make_image(1200, 900, seed=i)) for i in range(40)]
stage = Download(allow_addresses=["127.0.0.1"])
stage.setup()
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: the stage's, not the test images'
out = stage(pa.table({"url": pa.array(urls, pa.string())}))
print(out["_reject_reason"].to_pylist()[:4])
print(sum(r is None for r in out["_reject_reason"].to_pylist()))
print(peak_mib())
print(peak_mib(stage._reencode._child.process.pid))
"""


def test_a_hostile_pool_downloads_in_bounded_memory_and_time():
    """At the defaults, bombs that took 6.5 GB and minutes in one worker cost their rows only."""
    import subprocess
    import sys

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _HOSTILE_POOL_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reasons, kept, worker_mib, decoder_mib = done.stdout.strip().splitlines()
    assert reasons == "['decompression_bomb', 'decompression_bomb', 'decode_error', None]" and kept == "40"
    assert int(worker_mib) < 1024 and int(decoder_mib) < 1024, (worker_mib, decoder_mib)
    assert time.monotonic() - start < 200  # the scan bomb alone decodes for minutes
