"""A loopback HTTP server for download tests: real images plus every hostile case we refuse.

Paths (``<img>`` names an image registered with :meth:`ImageServer.add`):

- ``/img/<img>``: the image; ``/status/<code>``: that status, empty body
- ``/delay/<ms>/<img>``: the image after ``ms`` milliseconds
- ``/flaky/<n>/<img>``: 500 for the first ``n`` requests of this path, then the image
- ``/ratelimit/<seconds>/<n>/<img>``: 429 with ``Retry-After: <seconds>`` ``n`` times, then the image
- ``/drip/<img>``: the image one byte every 0.2 s; ``/slow-headers``: no status line for 30 s
- ``/endless``: an unending body without Content-Length; ``/declared-huge``: Content-Length 10^12
- ``/bytes/<n>``: ``n`` bytes of a valid JPEG prefix padded (for the byte cap)
- ``/short/<img>``: Content-Length larger than the body sent, then the connection closes
- ``/html``: an HTML page served as ``image/jpeg``; ``/empty``: 200 with no body;
  ``/garbage``: an answer that is not HTTP
- ``/truncated/<img>``: the first half of the image; ``/bomb.png``: a 100,000 x 100,000 PNG header
- ``/robots/<variant>/<img>``: the image with an ``X-Robots-Tag`` from :data:`ROBOTS`
- ``/headers/<status>/<img or ->?<name>=<value>``: that status with those headers (``-``: no body)
- ``/redirect?to=<url>``: 302 to ``url``; ``/loop/a`` and ``/loop/b`` redirect to each other;
  ``/chain/<n>/<img>``: ``n`` redirects, then the image
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image

ROBOTS = {
    "noai": ["noai"],
    "noimageai": ["noimageai"],
    "noindex": ["noindex"],
    "noimageindex": ["noimageindex"],
    "listed": ["nofollow, noimageai"],
    "ours": ["vlmcurate: noai"],
    "ours-upper": ["VLMCurate: NoIndex"],
    "other-agent": ["otherbot: noai, noindex"],
    "harmless": ["nofollow", "max-image-preview: large"],
    "second-header": ["nofollow", "noai"],
}


def make_image(width: int = 320, height: int = 240, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A deterministic test image with some structure (so JPEG has real entropy data)."""
    image = Image.new("RGB", (width, height))
    pixels = image.load()
    for x in range(width):
        for y in range(height):
            pixels[x, y] = ((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, ((x ^ y) + seed) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000, color_type: int = 0, bit_depth: int = 1) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb).

    ``color_type`` 6 with ``bit_depth`` 8 is RGBA.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


class ImageServer:
    """Serves the scripted paths above on 127.0.0.1 from a background thread."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.requests[self.path] += 1
                    count = server.requests[self.path]
                try:
                    server._route(self, count)
                except KeyError:  # an image name nobody registered
                    server._send(self, 404, b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, name: str, data: bytes) -> str:
        self.images[name] = data
        return f"{self.base}/img/{name}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # Routing -------------------------------------------------------------------------------
    def _route(self, h: BaseHTTPRequestHandler, count: int) -> None:
        parts = urlsplit(h.path)
        segments = [unquote(segment) for segment in parts.path.strip("/").split("/")]
        kind, args = segments[0], segments[1:]
        if kind == "img":
            return self._send(h, 200, self.images[args[0]])
        if kind == "delay":
            time.sleep(int(args[0]) / 1000)
            return self._send(h, 200, self.images[args[1]])
        if kind == "status":
            return self._send(h, int(args[0]), b"")
        if kind == "flaky":
            return self._send(h, 500, b"") if count <= int(args[0]) else self._send(h, 200, self.images[args[1]])
        if kind == "ratelimit":
            if count <= int(args[1]):
                return self._send(h, 429, b"", {"Retry-After": args[0]})
            return self._send(h, 200, self.images[args[2]])
        if kind == "drip":
            return self._drip(h, self.images[args[0]])
        if kind == "slow-headers":
            time.sleep(30)
            return self._send(h, 200, b"")
        if kind == "endless":
            return self._endless(h)
        if kind == "declared-huge":
            return self._send(h, 200, b"\xff\xd8", {"Content-Length": str(10**12)}, exact=False)
        if kind == "bytes":
            data = make_image(64, 64)
            return self._send(h, 200, data[:2] + b"\x00" * (int(args[0]) - 2))
        if kind == "short":
            data = self.images[args[0]]
            return self._send(h, 200, data[: len(data) // 2], {"Content-Length": str(len(data))}, exact=False)
        if kind == "garbage":  # not HTTP at all
            h.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
            h.close_connection = True
            return None
        if kind == "html":
            return self._send(h, 200, b"<html><body>Not found</body></html>", {"Content-Type": "image/jpeg"})
        if kind == "empty":
            return self._send(h, 200, b"")
        if kind == "truncated":
            data = self.images[args[0]]
            return self._send(h, 200, data[: len(data) // 2])
        if kind == "bomb.png":
            return self._send(h, 200, bomb_png(), {"Content-Type": "image/png"})
        if kind == "robots":
            return self._send(h, 200, self.images[args[1]], robots=ROBOTS[args[0]])
        if kind == "headers":
            body = b"" if args[1] == "-" else self.images[args[1]]
            return self._send(
                h,
                int(args[0]),
                body,
                {k: v[0] for k, v in parse_qs(parts.query).items()},
                exact="Content-Length" not in parts.query,
            )
        if kind == "redirect":
            return self._send(h, 302, b"", {"Location": parse_qs(parts.query)["to"][0]})
        if kind == "loop":
            return self._send(h, 302, b"", {"Location": "/loop/b" if args[0] == "a" else "/loop/a"})
        if kind == "chain":
            hops = int(args[0])
            target = f"/chain/{hops - 1}/{args[1]}" if hops > 1 else f"/img/{args[1]}"
            return self._send(h, 302, b"", {"Location": target})
        return self._send(h, 404, b"")

    @staticmethod
    def _send(
        h, status: int, body: bytes, headers: dict | None = None, exact: bool = True, robots: list[str] | None = None
    ) -> None:
        h.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "image/jpeg")
        if exact:
            headers["Content-Length"] = str(len(body))
        for key, value in headers.items():
            h.send_header(key, value)
        for value in robots or []:
            h.send_header("X-Robots-Tag", value)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.close_connection = True

    @staticmethod
    def _drip(h, data: bytes) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Connection", "close")
        h.end_headers()
        for byte in data:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.2)

    @staticmethod
    def _endless(h) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        block = b"\x00" * 65536
        while True:
            h.wfile.write(block)
