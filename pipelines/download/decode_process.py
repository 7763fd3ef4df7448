"""Decoding untrusted images in a child process, with a memory limit and a deadline.

An image decoder is C code that allocates what a file asks for and runs for as long as the file
keeps it busy; some files make it do both far beyond what their header says (a GIF whose later
frame turns the whole image into BGRA, a JPEG of thousands of scans). :class:`DecodeProcess`
runs :class:`~pipelines.stage.decode.Reencoder` (img2dataset's resizer) in a child process, one image
at a time, after the header check in the calling process:

- **memory**: the child's address space is limited (``RLIMIT_AS``) to what it holds once started
  plus ``max_decode_bytes`` and some headroom; an allocation past that fails inside the decoder,
  the image is ``decompression_bomb``, and the child is replaced;
- **time**: the caller waits at most ``timeout`` seconds for an answer; past that the child is
  killed, the image is ``decode_timeout``, and a new child starts with the next image. The child
  also arms an alarm per image, so it cannot outlive a caller that died while it decoded;
- **crashes**: a child that dies mid-image costs that image (``decode_error``) and is replaced.

The child reads bodies from one pipe and writes answers to another (never stdout, where C
libraries print); its stderr goes to a temporary file, read when it fails to start.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import weakref
from dataclasses import asdict
from multiprocessing.connection import Connection

from pipelines.stage.decode import (
    DECODE_ERROR,
    DECODE_TIMEOUT,
    DECOMPRESSION_BOMB,
    DecodeLimits,
    Encoded,
    ImageRejected,
    Reencoder,
    ResizeSettings,
    allow_pixels,
    check_header,
)

#: Address space the child may take beyond ``max_decode_bytes``: the encoder, Python's own.
HEADROOM_BYTES = 512 * 1024**2
STARTUP_SECONDS = 120.0
_READY = b"ready"
_OK, _REJECTED, _OUT_OF_MEMORY = 0, 1, 2
_SIZES = struct.Struct("<BIIII")
# What numpy's MemoryError and OpenCV's allocator say when an allocation fails (the resizer
# turns every exception into its message).
_OUT_OF_MEMORY_WORDS = ("unable to allocate", "failed to allocate", "insufficient memory", "memoryerror")


class DecodeProcess:
    """Header check here, decode → resize → encode in a child process (see the module docstring).

    Not thread-safe: one caller thread, as the download stage decodes in its main thread.
    """

    def __init__(self, resize: ResizeSettings, limits: DecodeLimits, timeout: float) -> None:
        self.resize, self.limits, self.timeout = resize, limits, timeout
        allow_pixels(limits.max_pixels)
        self._child: _Child | None = None
        self.started = 0  # children started, for tests and logs

    def __call__(self, body: bytes) -> Encoded:
        check_header(body, self.limits, self.resize)
        child = self._running()
        try:
            child.jobs.send_bytes(body)
        except OSError:  # it died after its last answer: one more try with a fresh child
            self.close()
            child = self._running()
            child.jobs.send_bytes(body)
        if not child.results.poll(self.timeout):
            self.close()
            raise ImageRejected(DECODE_TIMEOUT, f"decoding took longer than {self.timeout:g}s")
        try:
            answer = child.results.recv_bytes()
        except (EOFError, OSError):
            status = self.close()
            raise ImageRejected(DECODE_ERROR, f"the decoder died ({_exit_text(status)})") from None
        status, width, height, original_width, original_height = _SIZES.unpack_from(answer)
        payload = answer[_SIZES.size :]
        if status == _OK:
            return Encoded(payload, width, height, original_width, original_height)
        if status == _OUT_OF_MEMORY:
            self.close()  # its heap may be left fragmented near the limit
        reason, _, detail = payload.decode("utf-8", "replace").partition("\0")
        raise ImageRejected(reason, detail)

    def close(self) -> int | None:
        """Stop the child (a new one starts with the next image); its exit status."""
        child, self._child = self._child, None
        return child.stop() if child is not None else None

    def _running(self) -> _Child:
        if self._child is None:
            self._child = _Child.start(self.resize, self.limits.max_decode_bytes, self.timeout)
            self.started += 1
        return self._child


class _Child:
    """A running decoder process and the two pipes to it."""

    def __init__(self, process: subprocess.Popen, jobs: Connection, results: Connection) -> None:
        self.process, self.jobs, self.results = process, jobs, results
        self._finalizer = weakref.finalize(self, _kill, process, jobs, results)

    @classmethod
    def start(cls, resize: ResizeSettings, max_decode_bytes: int, timeout: float) -> _Child:
        jobs_read, jobs_write = os.pipe()
        results_read, results_write = os.pipe()
        settings = json.dumps({"resize": asdict(resize), "max_decode_bytes": max_decode_bytes, "timeout": timeout})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        with tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pipelines.download.decode_process",
                        str(jobs_read),
                        str(results_write),
                        settings,
                    ],
                    pass_fds=(jobs_read, results_write),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                )
            finally:
                os.close(jobs_read)
                os.close(results_write)
            child = cls(process, Connection(jobs_write, readable=False), Connection(results_read, writable=False))
            try:
                ready = child.results.poll(STARTUP_SECONDS) and child.results.recv_bytes() == _READY
            except (EOFError, OSError):
                ready = False
            if not ready:
                child.stop()
                stderr.seek(0)
                raise RuntimeError(f"the image decoder process did not start: {stderr.read()[-2000:].decode()}")
        return child

    def stop(self) -> int | None:
        self._finalizer()
        return self.process.returncode


def _kill(process: subprocess.Popen, *connections: Connection) -> None:
    for connection in connections:
        connection.close()
    if process.poll() is None:
        process.kill()
    process.wait()


def _exit_text(status: int | None) -> str:
    if status is not None and status < 0:
        return f"signal {signal.Signals(-status).name}"
    return f"exit status {status}"


# The child ------------------------------------------------------------------------------------


def serve(jobs: Connection, results: Connection, settings: dict) -> None:
    """Answer each body on ``jobs`` with its re-encoded image or its rejection, until EOF."""
    reencode = Reencoder(ResizeSettings(**settings["resize"]))
    max_decode_bytes = settings["max_decode_bytes"]
    used = _address_space()
    if used is not None:  # Linux; elsewhere only the deadline holds
        limit = used + max_decode_bytes + HEADROOM_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    alarm = math.ceil(2 * settings["timeout"]) + 1
    results.send_bytes(_READY)
    while True:
        try:
            body = jobs.recv_bytes()
        except EOFError:
            return
        signal.setitimer(signal.ITIMER_REAL, alarm)  # SIGALRM's default action ends the process
        answer, out_of_memory = _answer(reencode, body, max_decode_bytes)
        signal.setitimer(signal.ITIMER_REAL, 0)
        results.send_bytes(answer)
        if out_of_memory:
            return


def _answer(reencode: Reencoder, body: bytes, max_decode_bytes: int) -> tuple[bytes, bool]:
    try:
        image = reencode(body)
    except ImageRejected as e:
        out_of_memory = e.reason == DECODE_ERROR and any(w in e.detail.lower() for w in _OUT_OF_MEMORY_WORDS)
        if out_of_memory:
            e = ImageRejected(
                DECOMPRESSION_BOMB, f"decoding needed more than max_decode_bytes={max_decode_bytes:,} ({e.detail})"
            )
        status = _OUT_OF_MEMORY if out_of_memory else _REJECTED
        return _SIZES.pack(status, 0, 0, 0, 0) + f"{e.reason}\0{e.detail[:500]}".encode(), out_of_memory
    except MemoryError:
        detail = f"decoding needed more than max_decode_bytes={max_decode_bytes:,}"
        return _SIZES.pack(_OUT_OF_MEMORY, 0, 0, 0, 0) + f"{DECOMPRESSION_BOMB}\0{detail}".encode(), True
    sizes = _SIZES.pack(_OK, image.width, image.height, image.original_width, image.original_height)
    return sizes + image.data, False


def _address_space() -> int | None:
    """This process's virtual memory size in bytes, where /proc tells it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    serve(
        Connection(int(sys.argv[1]), writable=False),
        Connection(int(sys.argv[2]), readable=False),
        json.loads(sys.argv[3]),
    )
