"""A loopback image server for benchmarks: ``GET /<n>.jpg`` returns image ``n`` (modulo the count)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(images: list[bytes], port_queue) -> None:
    """Serve ``images`` on 127.0.0.1 (a free port, put on ``port_queue``) until the process ends."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            index = int(self.path.split("?")[0].strip("/").split(".")[0]) % len(images)
            body = images[index]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    port_queue.put(server.server_address[1])
    server.serve_forever()
