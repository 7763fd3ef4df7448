"""A guarded HTTP(S) GET for untrusted URLs: the fetch step the download stage uses.

It replaces img2dataset's fetch (``urllib.request.urlopen`` with a per-socket timeout) and keeps
everything after it. What it adds:

- **addresses**: every hop of a redirect chain is resolved first and refused when any address is
  loopback, private, link-local, multicast, unspecified or otherwise not globally routable,
  including encoded forms (``2130706433``, ``0x7f000001``, ``0177.1``, ``[::ffff:127.0.0.1]``,
  6to4, Teredo, NAT64); the connection then goes to the checked address, so DNS cannot rebind
  in between. ``allow_addresses`` names the addresses or ranges that are allowed anyway.
- **limits**: a total deadline per attempt (connect, headers and body together, enforced by a
  watchdog that shuts the socket, so a server dripping bytes cannot hold a thread), a byte cap
  enforced while reading, a redirect limit and loop detection, no content decoding.
- **opt-out**: ``X-Robots-Tag`` directives (``noai``, ``noimageai``, ``noindex``,
  ``noimageindex`` by default) for every agent or addressed to this user agent.
- **retries**: only transient failures (timeouts, connection errors, 429, 5xx) are retried,
  with exponential backoff and full jitter, honouring ``Retry-After`` up to a cap.

Every failure is a :class:`FetchError` with a reason for the reject record: ``http_<status>``,
``timeout``, ``dns``, ``connection``, ``too_large``, ``opt_out``, ``blocked_address``,
``too_many_redirects``, ``bad_url``.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import ipaddress
import itertools
import random
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

TIMEOUT = "timeout"
DNS = "dns"
CONNECTION = "connection"
TOO_LARGE = "too_large"
OPT_OUT = "opt_out"
BLOCKED_ADDRESS = "blocked_address"
TOO_MANY_REDIRECTS = "too_many_redirects"
BAD_URL = "bad_url"

DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16
DNS_CACHE_SECONDS = 300.0
# X-Robots-Tag directives that take a value after a colon (so "name:" is not a user agent).
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


class FetchError(Exception):
    """A failed fetch: ``reason`` for the reject record, whether a retry may help, and when."""

    def __init__(self, reason: str, detail: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retry_after = retry_after


def is_transient_reason(reason: str) -> bool:
    """Whether a reject reason names a failure that a later attempt may not repeat."""
    if reason in (TIMEOUT, CONNECTION, "http_408", "http_429"):
        return True
    return reason.startswith("http_5")


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and rules for fetching one URL (see the module docstring)."""

    timeout: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    user_agent_token: str = "vlmcurate"
    disallowed_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    allow_addresses: tuple[str, ...] = field(default_factory=tuple)

    @property
    def user_agent(self) -> str:
        return f"Mozilla/5.0 (compatible; {self.user_agent_token}/0.1; image-text dataset curation)"


class Fetcher:
    """Fetches URLs under a :class:`FetchPolicy`; thread-safe, one per worker."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self.allowed = self.check_allow_list(policy.allow_addresses)
        self.disallowed = {d.strip().lower() for d in policy.disallowed_directives}
        self.agent = policy.user_agent_token.strip().lower()
        self._ssl = ssl.create_default_context()
        self._watchdog = _Watchdog()
        # getaddrinfo cannot be interrupted: it runs here so a hung resolver cannot pass the deadline.
        self._resolver = ThreadPoolExecutor(max_workers=8, thread_name_prefix="resolve")
        # Checked answers per (host, port): a crawl asks the same hosts again and again. The
        # connection goes to the checked address, so a later, different answer cannot sneak in.
        self._dns: dict[tuple[str, int], tuple[str, float]] = {}

    @staticmethod
    def check_allow_list(entries) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Parse addresses or CIDR ranges (``127.0.0.1``, ``10.0.0.0/8``); ValueError names a bad one."""
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR range") from None
        return networks

    def close(self) -> None:
        self._watchdog.stop()
        self._resolver.shutdown(wait=False, cancel_futures=True)

    def fetch(self, url: str) -> bytes:
        """The body of ``url`` after redirects, or :class:`FetchError`; transient errors are retried."""
        attempt = 0
        while True:
            try:
                return self._attempt(url)
            except FetchError as error:
                if not error.transient or attempt >= self.policy.retries:
                    raise
                delay = random.uniform(0, min(self.policy.max_backoff, self.policy.backoff * 2**attempt))
                if error.retry_after is not None:
                    if error.retry_after > self.policy.max_retry_after:
                        raise
                    delay = max(delay, error.retry_after)
                time.sleep(delay)
                attempt += 1

    def _attempt(self, url: str) -> bytes:
        deadline = time.monotonic() + self.policy.timeout
        seen = []
        while True:
            seen.append(url)
            target = self._target(url, deadline)
            status, headers, body = self._request(target, deadline)
            if status in _REDIRECTS and headers.get("Location"):
                url = urljoin(url, headers["Location"])
                if url in seen:
                    raise FetchError(TOO_MANY_REDIRECTS, f"redirect loop back to {url}")
                if len(seen) > self.policy.max_redirects:
                    raise FetchError(TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects} redirects")
                continue
            return body

    # A hop: parse, resolve, check ------------------------------------------------------------
    def _target(self, url: str, deadline: float) -> _Target:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError(BAD_URL, f"unparseable url: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(BAD_URL, f"not an http(s) url: {url[:200]}")
        host = parts.hostname
        port = port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        address = self._resolve(host, port, deadline)
        return _Target(parts.scheme, host, port, path, address)

    def _resolve(self, host: str, port: int, deadline: float) -> str:
        cached = self._dns.get((host, port))
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            ipaddress.ip_address(host)  # a plain address needs no resolver thread
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except ValueError:
            infos = self._lookup(host, port, deadline)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            category = blocked_category(ipaddress.ip_address(address.split("%")[0]), self.allowed)
            if category:
                raise FetchError(BLOCKED_ADDRESS, f"{host} resolves to {category} address {address}")
        self._dns[(host, port)] = (addresses[0], time.monotonic() + DNS_CACHE_SECONDS)
        return addresses[0]

    def _lookup(self, host: str, port: int, deadline: float) -> list:
        future = self._resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            return future.result(timeout=max(deadline - time.monotonic(), 0.001))
        except FutureTimeout:
            raise FetchError(TIMEOUT, f"resolving {host} took longer than the deadline", transient=True) from None
        except socket.gaierror as e:
            raise FetchError(DNS, f"{host}: {e.strerror}", transient=e.errno == socket.EAI_AGAIN) from None
        except (UnicodeError, OSError) as e:
            raise FetchError(BAD_URL, f"{host}: {e}") from None

    # A request over a fresh connection to the checked address ------------------------------
    def _request(self, target: _Target, deadline: float) -> tuple[int, http.client.HTTPMessage, bytes]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(TIMEOUT, f"deadline of {self.policy.timeout:g}s passed", transient=True)
        sock = None
        token = None
        try:
            sock = socket.create_connection((target.address, target.port), timeout=remaining)
            token = self._watchdog.watch(sock, deadline)
            if target.scheme == "https":
                # wrap_socket detaches the plain socket: watch the TLS one in its place.
                self._watchdog.release(token)
                token = None
                sock = self._ssl.wrap_socket(sock, server_hostname=target.host)
                token = self._watchdog.watch(sock, deadline)
            connection = http.client.HTTPConnection(target.host, target.port, timeout=remaining)
            connection.sock = sock
            connection.request("GET", target.path, headers={
                "User-Agent": self.policy.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity",
            })
            response = connection.getresponse()
            status, headers = response.status, response.headers
            if status in _REDIRECTS:
                return status, headers, b""
            if status != 200:
                raise FetchError(f"http_{status}", f"{response.reason} from {target.host}",
                                 transient=status in (408, 429) or status >= 500,
                                 retry_after=_retry_after(headers.get("Retry-After")))
            if self._opted_out(headers):
                raise FetchError(OPT_OUT, f"X-Robots-Tag: {'; '.join(headers.get_all('X-Robots-Tag', []))}")
            return status, headers, self._read_body(response, deadline)
        except FetchError:
            raise
        except ssl.SSLError as e:
            raise FetchError(CONNECTION, f"TLS: {e.reason or e}") from None
        except TimeoutError:
            raise FetchError(TIMEOUT, f"no answer within the {self.policy.timeout:g}s deadline", transient=True) \
                from None
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:  # the watchdog shut the socket
                raise FetchError(TIMEOUT, f"deadline of {self.policy.timeout:g}s passed", transient=True) from None
            raise FetchError(CONNECTION, f"{type(e).__name__}: {e}"[:300], transient=True) from None
        finally:
            if token is not None:
                self._watchdog.release(token)
            if sock is not None:
                sock.close()

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        cap = self.policy.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise FetchError(TOO_LARGE, f"Content-Length {int(declared):,} exceeds the {cap:,}-byte cap")
        chunks, size = [], 0
        while True:
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise FetchError(TOO_LARGE, f"body exceeds the {cap:,}-byte cap")
            chunks.append(chunk)
        if time.monotonic() >= deadline:  # the watchdog may have cut the body short
            raise FetchError(TIMEOUT, f"body not complete within {self.policy.timeout:g}s", transient=True)
        body = b"".join(chunks)
        if declared and declared.isdigit() and len(body) < int(declared):
            raise FetchError(CONNECTION, f"body ended after {len(body):,} of {int(declared):,} bytes", transient=True)
        return body

    def _opted_out(self, headers: http.client.HTTPMessage) -> bool:
        return any(opts_out(value, self.agent, self.disallowed) for value in headers.get_all("X-Robots-Tag", []))


def opts_out(value: str, agent: str, disallowed: set[str]) -> bool:
    """Whether one ``X-Robots-Tag`` header value forbids use by ``agent``.

    ``noai, noindex`` applies to every agent; ``someagent: noai`` only to ``someagent``;
    valued directives (``max-image-preview: none``) are not mistaken for agent names.
    """
    head, sep, rest = value.partition(":")
    scope = head.strip().lower()
    if sep and scope and " " not in scope and "," not in scope and scope not in _VALUED_DIRECTIVES:
        if scope != agent:
            return False
        value = rest
    directives = {part.strip().lower() for part in value.split(",")}
    return bool(directives & disallowed)


def blocked_category(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why ``address`` may not be fetched from (``None`` if it may), looking through IPv6 wrappings."""
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
    if any(a in network for a in candidates for network in allowed if a.version == network.version):
        return None
    for a in candidates:
        # Most specific first: 169.254.169.254 is link-local (and also counted as private).
        for category in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(a, f"is_{category}"):
                return category.replace("_", "-")
        if not a.is_global:
            return "non-global"
    return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str


class _Watchdog:
    """One thread that shuts sockets whose deadline has passed (a blocked read then returns)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._sockets: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, deadline: float) -> int:
        token = next(self._ids)
        with self._wake:
            self._sockets[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            if self._heap[0][1] == token:
                self._wake.notify()
        return token

    def release(self, token: int) -> None:
        with self._wake:
            self._sockets.pop(token, None)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][1] not in self._sockets):
                    _, token = heapq.heappop(self._heap)
                    sock = self._sockets.pop(token, None)
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                self._wake.wait(timeout=(self._heap[0][0] - now) if self._heap else None)
