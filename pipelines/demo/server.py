"""The demo's image host on 127.0.0.1: generated scenes, and the failures a crawl meets.

``/scene/<i>.jpg`` renders scene ``i`` (cached); ``/near/<i>.jpg`` is scene ``i`` rescaled and
re-encoded at a lower quality (a near-duplicate: other bytes, the same picture); ``/photo/<i>.jpg``
is a crop of a real photograph that ships with matplotlib (Grace Hopper's portrait), a different
crop per ``i``; ``/missing/...`` is a 404; ``/html/...`` is a web page served as ``image/jpeg``;
``/tiny/<i>.jpg`` is a 24-pixel thumbnail; ``/optout/...`` carries ``X-Robots-Tag: noai``. Query
strings are ignored, so ``?copy=2`` serves the same bytes under another url (an image duplicate).
"""

from __future__ import annotations

import functools
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from pipelines.demo.scenes import photo_crop, render, scene

DEFAULT_PORT = 8719


@functools.lru_cache(maxsize=8192)
def _scene_bytes(index: int) -> bytes:
    return render(scene(index))


@functools.lru_cache(maxsize=1024)
def _tiny_bytes(index: int) -> bytes:
    """Scene ``index`` as a 24-pixel thumbnail."""
    image = Image.open(io.BytesIO(_scene_bytes(index)))
    image.thumbnail((24, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1024)
def _near_bytes(index: int) -> bytes:
    """Scene ``index`` scaled to 90% and saved at JPEG quality 60."""
    image = Image.open(io.BytesIO(_scene_bytes(index)))
    image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=60)
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _photo_bytes(index: int) -> bytes:
    """A crop of matplotlib's sample photograph, placed and sized by ``index``."""
    return photo_crop(index)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].strip("/").split("/")
        kind, name = path[0], path[-1]
        index = int(name.split(".")[0]) if name.split(".")[0].isdigit() else 0
        headers = {}
        if kind == "scene":
            status, body = 200, _scene_bytes(index)
        elif kind == "near":
            status, body = 200, _near_bytes(index)
        elif kind == "photo":
            status, body = 200, _photo_bytes(index)
        elif kind == "tiny":
            status, body = 200, _tiny_bytes(index)
        elif kind == "optout":
            status, body, headers = 200, _scene_bytes(index), {"X-Robots-Tag": "noai"}
        elif kind == "html":
            status, body = 200, b"<!doctype html><title>Moved</title><p>This page has moved.</p>"
        else:
            status, body = 404, b""
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class DemoImageServer:
    """Serves the demo images on ``127.0.0.1:port`` from a daemon thread."""

    def __init__(self, port: int = DEFAULT_PORT) -> None:
        try:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        except OSError as e:
            raise OSError(
                f"cannot serve the demo images on 127.0.0.1:{port} ({e.strerror}); pass --port with a free port"
            ) from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
