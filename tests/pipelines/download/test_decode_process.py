"""The decoder child process: what the header cannot price is bounded by its memory limit and deadline."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipelines.download import decode_process
from pipelines.download.decode_process import DecodeProcess
from pipelines.stage.decode import DecodeLimits, ImageRejected, ResizeSettings
from tests.http_server import make_image
from tests.images import animated_gif, repeated_scans

#: Decoding the scan bomb below takes minutes: anything near that is a hang, not a slow machine.
HANG = 60


@pytest.fixture()
def decoder():
    decoder = DecodeProcess(
        ResizeSettings(image_size=256, min_image_size=16), DecodeLimits(max_jpeg_scans=10**6), timeout=1.0
    )
    yield decoder
    decoder.close()


def test_images_come_back_encoded_and_failures_with_their_reasons(decoder):
    encoded = decoder(make_image(640, 480))
    assert (encoded.width, encoded.height, encoded.original_width, encoded.original_height) == (341, 256, 640, 480)
    assert encoded.data[:3] == b"\xff\xd8\xff"
    with pytest.raises(ImageRejected) as small:
        decoder(make_image(8, 8))
    assert small.value.reason == "too_small"
    assert decoder(make_image(300, 300)).width == 256  # the same child goes on
    assert decoder.started == 1


def test_a_decode_past_its_deadline_is_killed_and_the_next_image_decodes(decoder):
    bomb = repeated_scans(4096, 20_000)  # 760 KB that keep libjpeg busy for minutes
    start = time.monotonic()
    with pytest.raises(ImageRejected) as slow:
        decoder(bomb)
    assert time.monotonic() - start < HANG
    assert slow.value.reason == "decode_timeout" and "1s" in slow.value.detail
    assert decoder(make_image(320, 240)).original_width == 320
    assert decoder.started == 2


def test_a_child_that_dies_costs_only_the_image_it_was_decoding():
    decoder = DecodeProcess(ResizeSettings(), DecodeLimits(max_jpeg_scans=10**6), timeout=HANG)
    try:
        decoder(make_image(64, 64))
        child = decoder._child.process
        threading.Timer(0.5, os.kill, (child.pid, signal.SIGKILL)).start()
        with pytest.raises(ImageRejected) as died:
            decoder(repeated_scans(4096, 20_000))
        assert died.value.reason == "decode_error" and "SIGKILL" in died.value.detail
        assert decoder(make_image(64, 64)).width == 64
    finally:
        decoder.close()


def test_a_child_killed_between_images_is_replaced_without_a_reject(decoder):
    decoder(make_image(64, 64))
    os.kill(decoder._child.process.pid, signal.SIGKILL)
    decoder._child.process.wait()
    assert decoder(make_image(64, 64)).width == 64
    assert decoder.started == 2


def test_an_allocation_past_the_memory_limit_is_a_bomb_and_ends_the_child():
    # The child's own limit, beneath the header check: it allows max_decode_bytes (here 1 byte)
    # plus its headroom, and the GIF's float64 alpha blend needs far more.
    child = decode_process._Child.start(ResizeSettings(), max_decode_bytes=1, timeout=60)
    try:
        child.jobs.send_bytes(animated_gif(6000))
        assert child.results.poll(HANG)
        status, *_ = decode_process._SIZES.unpack_from(answer := child.results.recv_bytes())
        reason, _, detail = answer[decode_process._SIZES.size :].decode().partition("\0")
        assert status == decode_process._OUT_OF_MEMORY
        assert reason == "decompression_bomb" and "max_decode_bytes=1" in detail
        assert child.process.wait(timeout=HANG) == 0  # it ends itself, to be replaced
    finally:
        child.stop()
