"""Which addresses a download may connect to, and a resolver that only returns allowed ones.

An address is refused when it (or the IPv4 address an IPv6 form wraps: mapped, 6to4, Teredo,
NAT64, IPv4-compatible) is loopback, link-local, multicast, unspecified, reserved, private or
otherwise not globally routable, unless an ``allow`` entry (address or CIDR range) covers it.
The resolver checks every address a name resolves to, refuses the name if any is refused, and
caches checked answers (and failures, briefly) so a crawl does not ask the same host twice.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

POSITIVE_SECONDS = 300.0
NEGATIVE_SECONDS = 60.0
CACHE_ENTRIES = 100_000


class ResolveError(Exception):
    """A name that cannot be used: ``kind`` is ``dns``, ``timeout``, ``blocked`` or ``bad_url``."""

    def __init__(self, kind: str, detail: str, transient: bool = False):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.transient = transient


def parse_allow_list(entries) -> list[Network]:
    """Parse addresses or CIDR ranges (``127.0.0.1``, ``10.0.0.0/8``); ValueError names a bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR range") from None
    return networks


def blocked_category(address: Address, allowed: list[Network]) -> str | None:
    """Why ``address`` may not be fetched from (``None`` if it may), looking through IPv6 wrappings.

    An allow entry admits the address a connection goes to: an IPv4 entry admits that IPv4
    address and its IPv4-mapped form (the same socket address), not the 6to4, Teredo, NAT64 or
    IPv4-compatible IPv6 addresses that embed it, which are other hosts.
    """
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour]
        if address.teredo:
            embedded += list(address.teredo)
        # NAT64, and the deprecated IPv4-compatible form (::a.b.c.d, not :: or ::1).
        compatible = address in ipaddress.ip_network("::/96") and int(address) > 0xFFFF
        if address in ipaddress.ip_network("64:ff9b::/96") or compatible:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        candidates = [a for a in embedded if a is not None] + candidates  # name the IPv4 inside first
    connected = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    if any(connected in network for network in allowed if connected.version == network.version):
        return None
    for a in candidates:
        # Most specific first: 169.254.169.254 is link-local (and also counted as private).
        for category in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(a, f"is_{category}"):
                return category.replace("_", "-")
        if not a.is_global:
            return "non-global"
    return None


class Resolver:
    """Resolves names to checked addresses, off the calling thread, within a deadline.

    ``getaddrinfo`` cannot be interrupted, so lookups run in a pool of ``threads`` (as many as
    fetch threads, so slow names cannot starve the rest); a lookup still queued when its
    caller's deadline passes is cancelled. The pool's threads are daemons: a lookup hung in the
    system resolver does not hold the process at exit.
    """

    def __init__(self, allowed: list[Network], threads: int) -> None:
        self.allowed = allowed
        self._pool = _DaemonPool(max(1, threads))
        self._cache: OrderedDict[tuple[str, int], tuple[float, list[str] | ResolveError]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown()

    def resolve(self, host: str, port: int, deadline: float) -> list[str]:
        """The host's addresses, all allowed, in resolver order; or :class:`ResolveError`."""
        key = (host, port)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > time.monotonic():
                self._cache.move_to_end(key)
                if isinstance(cached[1], ResolveError):  # a fresh exception: threads share the cache
                    raise ResolveError(cached[1].kind, cached[1].detail, cached[1].transient)
                return cached[1]
        try:
            addresses = self._check(host, self._lookup(host, port, deadline))
        except ResolveError as error:
            if error.kind != "timeout":
                self._remember(key, error, NEGATIVE_SECONDS)
            raise
        self._remember(key, addresses, POSITIVE_SECONDS)
        return addresses

    def _lookup(self, host: str, port: int, deadline: float) -> list:
        try:
            ipaddress.ip_address(host)  # a plain address resolves at once, without a thread
            return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except ValueError:
            pass
        except socket.gaierror as e:
            raise ResolveError("bad_url", f"{host}: {e.strerror}") from None
        future = self._pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            return future.result(timeout=max(deadline - time.monotonic(), 0.001))
        except FutureTimeout:
            future.cancel()
            raise ResolveError("timeout", f"resolving {host} took longer than the deadline", transient=True) from None
        except socket.gaierror as e:
            raise ResolveError("dns", f"{host}: {e.strerror}", transient=e.errno == socket.EAI_AGAIN) from None
        except (UnicodeError, OSError) as e:
            raise ResolveError("bad_url", f"{host}: {e}") from None

    def _check(self, host: str, infos: list) -> list[str]:
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            category = blocked_category(ipaddress.ip_address(address.split("%")[0]), self.allowed)
            if category:
                raise ResolveError("blocked", f"{host} resolves to {category} address {address}")
        if not addresses:
            raise ResolveError("dns", f"{host}: no address")
        return addresses

    def _remember(self, key, value, seconds: float) -> None:
        with self._lock:
            self._cache[key] = (time.monotonic() + seconds, value)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)


class _DaemonPool:
    """A fixed pool of daemon threads running submitted calls (``ThreadPoolExecutor``'s threads
    are joined at interpreter exit, so one hung call would delay the exit until it returns)."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"resolve-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, function, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, function, args))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, function, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)
