"""Socket helpers of the download tests: where fetches connect, listeners that never answer."""

from __future__ import annotations

import socket
import threading


def record_connections(monkeypatch) -> list[tuple[str, int]]:
    """The addresses every fetch in this test connects to (it still connects)."""
    connections = []
    connect = socket.create_connection

    def recording(address, *args, **kwargs):
        connections.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return connections


def silent_server(host: str = "127.0.0.1", accept: bool = True):
    """A TCP listener that never says a word; returns (socket, port, accepted list).

    Without ``accept`` nobody accepts: a connection made to it waits in the listener's queue.
    """
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(16)
    accepted = []
    if not accept:
        return listener, listener.getsockname()[1], accepted

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1], accepted
