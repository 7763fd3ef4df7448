"""A guarded HTTP(S) GET for untrusted URLs: the fetch step the download stage uses.

It replaces img2dataset's fetch (``urllib.request.urlopen`` with a per-socket timeout) and keeps
everything after it. What it adds:

- **addresses** (:mod:`pipelines.download.netpolicy`): every hop of a redirect chain is resolved first
  and refused when any address is loopback, private, link-local, multicast, unspecified or
  otherwise not globally routable, including encoded and IPv6-wrapped forms; the connection
  then goes to a checked address (each in turn), so DNS cannot rebind in between.
- **limits**: a deadline per attempt (connect, TLS handshake, headers and body together,
  enforced by a watchdog that shuts the socket, so a server dripping bytes cannot hold a
  thread) inside a budget per url that also covers retries and waits; a byte cap enforced while
  reading; a redirect limit and loop detection; no content decoding.
- **opt-out**: ``X-Robots-Tag`` directives (``noai``, ``noimageai``, ``noindex``,
  ``noimageindex``, and ``none``, which means noindex) for every agent or addressed to one of
  ``robots_agents``.
- **retries**: only transient failures (timeouts, connection errors, 408, 429, 5xx) are retried,
  with exponential backoff and full jitter, honouring ``Retry-After`` while the budget allows.

Every failure is a :class:`FetchError` with a reason for the reject record: ``http_<status>``,
``timeout``, ``dns``, ``connection``, ``tls``, ``protocol_error``, ``too_large``, ``opt_out``,
``blocked_address``, ``too_many_redirects``, ``bad_url``.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import itertools
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit

from pipelines.download.netpolicy import ResolveError, Resolver, parse_allow_list

TIMEOUT = "timeout"
DNS = "dns"
CONNECTION = "connection"
TLS = "tls"
PROTOCOL_ERROR = "protocol_error"
TOO_LARGE = "too_large"
OPT_OUT = "opt_out"
BLOCKED_ADDRESS = "blocked_address"
TOO_MANY_REDIRECTS = "too_many_redirects"
BAD_URL = "bad_url"

DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16
# X-Robots-Tag directives that take a value after a colon (so "name:" is not a user agent).
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
# Characters left as they are when a url's path and query are percent-encoded (RFC 3986).
_URL_SAFE = "/%:@!$&'()*+,;=-._~?"
_RESOLVE_REASONS = {"dns": DNS, "timeout": TIMEOUT, "blocked": BLOCKED_ADDRESS, "bad_url": BAD_URL}


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
    """Limits and rules for fetching one url (see the module docstring).

    ``timeout`` bounds one attempt; ``total_timeout`` bounds the url, attempts and waits together.
    """

    timeout: float = 10.0
    total_timeout: float = 30.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    user_agent_token: str = "vlmcurate"
    robots_agents: tuple[str, ...] = ("vlmcurate", "img2dataset")
    disallowed_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    allow_addresses: tuple[str, ...] = field(default_factory=tuple)
    resolver_threads: int = 32

    @property
    def user_agent(self) -> str:
        return f"Mozilla/5.0 (compatible; {self.user_agent_token}/0.1; image-text dataset curation)"


class BodyBudget:
    """The bytes of response bodies one worker may hold at once, across its fetch threads.

    A thread reading a body takes its bytes as they arrive and waits, until its deadline, while
    the budget is spent. Bodies read whole are held until their holder releases them; while none
    is, nothing else will free room, so the body read the longest may grow past the limit and
    some fetch always finishes. The most held is ``limit`` plus one body.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._readers: list[_BodyReader] = []  # oldest first
        self._changed = threading.Condition()

    def reader(self) -> _BodyReader:
        with self._changed:
            reader = _BodyReader()
            self._readers.append(reader)
            return reader

    def take(self, reader: _BodyReader, size: int, deadline: float) -> bool:
        """Take ``size`` bytes for ``reader``; False if there was no room before ``deadline``."""
        with self._changed:
            while self.used + size > self.limit and not self._may_overdraw(reader):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            self.used += size
            reader.taken += size
            return True

    def done_reading(self, reader: _BodyReader) -> None:
        with self._changed:
            self._readers.remove(reader)
            self._changed.notify_all()

    def release(self, size: int) -> None:
        """Give back the bytes of a body its holder is done with."""
        with self._changed:
            self.used -= size
            self._changed.notify_all()

    def _may_overdraw(self, reader: _BodyReader) -> bool:
        held_by_readers = sum(r.taken for r in self._readers)
        return self._readers[0] is reader and self.used == held_by_readers


@dataclass(eq=False)  # readers are told apart by identity
class _BodyReader:
    taken: int = 0


class Fetcher:
    """Fetches urls under a :class:`FetchPolicy`; thread-safe, one per worker.

    ``clock`` and ``sleep`` time the retry loop: the per-url budget is kept on ``clock`` and the
    waits between attempts (backoff, ``Retry-After``) are ``sleep``; tests pass virtual ones. The
    deadline within an attempt is on ``time.monotonic``, whatever ``clock`` is.
    """

    check_allow_list = staticmethod(parse_allow_list)

    def __init__(
        self,
        policy: FetchPolicy,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.disallowed = {d.strip().lower() for d in policy.disallowed_directives}
        if "noindex" in self.disallowed:
            self.disallowed.add("none")  # "none" is noindex, nofollow
        self.agents = {a.strip().lower() for a in (*policy.robots_agents, policy.user_agent_token)}
        self._ssl = ssl.create_default_context()
        self._watchdog = _Watchdog()
        self._resolver = Resolver(parse_allow_list(policy.allow_addresses), policy.resolver_threads)

    def close(self) -> None:
        self._watchdog.stop()
        self._resolver.close()

    def fetch(self, url: str, bodies: BodyBudget | None = None) -> bytes:
        """The body of ``url`` after redirects, or :class:`FetchError`; transient errors are retried.

        With ``bodies``, the body's bytes are taken from that budget as they arrive; the caller
        gives them back (:meth:`BodyBudget.release`) once it is done with the body.
        """
        budget_end = self.clock() + self.policy.total_timeout
        attempt = 0
        while True:
            allowed = min(self.policy.timeout, budget_end - self.clock())  # this attempt's share of the budget
            try:
                return self._attempt(url, time.monotonic() + allowed, bodies)
            except FetchError as error:
                if not error.transient or attempt >= self.policy.retries:
                    raise
                delay = random.uniform(0, min(self.policy.max_backoff, self.policy.backoff * 2**attempt))
                if error.retry_after is not None:
                    if error.retry_after > self.policy.max_retry_after:
                        raise
                    delay = max(delay, error.retry_after)
                if self.clock() + delay >= budget_end:  # no time left for another attempt
                    raise
                self.sleep(delay)
                attempt += 1

    def _attempt(self, url: str, deadline: float, bodies: BodyBudget | None) -> bytes:
        seen = []
        while True:
            seen.append(url)
            target = self._target(url, deadline)
            status, location, body = self._request(target, deadline, bodies)
            if status in _REDIRECTS:
                try:
                    url = urljoin(url, location)
                except ValueError as e:  # urljoin parses the target: "http://[::1" is not a url
                    raise FetchError(BAD_URL, f"unparseable redirect target {location[:200]!r}: {e}") from None
                if url in seen:
                    raise FetchError(TOO_MANY_REDIRECTS, f"redirect loop back to {url[:200]}")
                if len(seen) > self.policy.max_redirects:
                    raise FetchError(TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects} redirects")
                continue
            return body

    # A hop: parse, resolve, check ------------------------------------------------------------
    def _target(self, url: str, deadline: float) -> Target:
        try:
            parts = urlsplit(url.strip())
            port = parts.port
            host = parts.hostname.encode("idna").decode("ascii") if parts.hostname else ""
        except (ValueError, UnicodeError) as e:
            raise FetchError(BAD_URL, f"unparseable url: {e}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise FetchError(BAD_URL, f"not an http(s) url: {url[:200]}")
        port = port or (443 if parts.scheme == "https" else 80)
        path = quote(parts.path or "/", safe=_URL_SAFE) + (
            f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else ""
        )
        try:
            addresses = self._resolver.resolve(host, port, deadline)
        except ResolveError as e:
            raise FetchError(_RESOLVE_REASONS[e.kind], e.detail, transient=e.transient) from None
        return Target(parts.scheme, host, port, path, tuple(addresses))

    # A request over a fresh connection to a checked address ----------------------------------
    def _request(self, target: Target, deadline: float, bodies: BodyBudget | None) -> tuple[int, str, bytes]:
        sock = connection = response = None
        token = None
        try:
            sock = self._connect(target, deadline)
            token = self._watchdog.watch(sock, deadline)
            if target.scheme == "https":
                # wrap_socket detaches the plain socket: watch the TLS one in its place, and
                # hand-shake only then, so the handshake is inside the deadline too.
                self._watchdog.release(token)
                token = None
                sock = self._ssl.wrap_socket(sock, server_hostname=target.host, do_handshake_on_connect=False)
                token = self._watchdog.watch(sock, deadline)
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.do_handshake()
            connection = http.client.HTTPConnection(target.host, target.port)
            connection.sock = sock
            connection.request(
                "GET",
                target.path,
                headers={
                    "User-Agent": self.policy.user_agent,
                    "Accept": "image/*,*/*;q=0.5",
                    "Accept-Encoding": "identity",
                },
            )
            response = connection.getresponse()
            status, headers = response.status, response.headers
            if status in _REDIRECTS and headers.get("Location"):
                return status, _header_text(headers["Location"]), b""
            if status != 200:
                raise FetchError(
                    f"http_{status}",
                    f"{response.reason} from {target.host}",
                    transient=status in (408, 429) or status >= 500,
                    retry_after=retry_after_seconds(headers.get("Retry-After")),
                )
            if self._opted_out(headers):
                raise FetchError(OPT_OUT, f"X-Robots-Tag: {'; '.join(headers.get_all('X-Robots-Tag', []))}")
            return status, "", self._read_body(response, deadline, bodies)
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the transfer becomes a reason
            raise self._classify(e, deadline) from None
        finally:
            if token is not None:
                self._watchdog.release(token)
            for closable in (response, connection, sock):  # the response's file keeps the fd open
                if closable is not None:
                    closable.close()

    def _connect(self, target: Target, deadline: float) -> socket.socket:
        """A connection to the first checked address that answers."""
        error: OSError | None = None
        for address in target.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return socket.create_connection((address, target.port), timeout=remaining)
            except OSError as e:
                error = e
        if error is None:
            raise TimeoutError("no time left to connect")
        raise error

    def _classify(self, error: Exception, deadline: float) -> FetchError:
        late = time.monotonic() >= deadline  # the watchdog shut the socket, or time simply ran out
        if isinstance(error, TimeoutError) or late:
            return FetchError(TIMEOUT, f"not complete within the {self.policy.timeout:g}s deadline", transient=True)
        if isinstance(error, ssl.SSLError):
            return FetchError(TLS, str(error.reason or error)[:300])
        if isinstance(error, (http.client.InvalidURL, UnicodeError, ValueError)):
            return FetchError(BAD_URL, f"{type(error).__name__}: {error}"[:300])
        if (
            isinstance(error, (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected))
            or type(error) is OSError
        ):
            return FetchError(CONNECTION, f"{type(error).__name__}: {error}"[:300], transient=True)
        if isinstance(error, (http.client.HTTPException, OSError)):  # a server breaking the protocol
            return FetchError(PROTOCOL_ERROR, f"{type(error).__name__}: {error}"[:300])
        raise error

    def _read_body(self, response: http.client.HTTPResponse, deadline: float, bodies: BodyBudget | None) -> bytes:
        cap = self.policy.max_bytes
        declared = _ascii_int(response.headers.get("Content-Length"))
        if declared is not None and declared > cap:
            raise FetchError(TOO_LARGE, f"Content-Length {declared:,} exceeds the {cap:,}-byte cap")
        chunks, size = [], 0
        reader = bodies.reader() if bodies is not None else None
        try:
            while True:
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise FetchError(TOO_LARGE, f"body exceeds the {cap:,}-byte cap")
                if reader is not None and not bodies.take(reader, len(chunk), deadline):
                    raise FetchError(
                        TIMEOUT,
                        f"no room for the body within {self.policy.timeout:g}s: the worker "
                        f"holds max_bytes_in_flight={bodies.limit:,} bytes of bodies",
                        transient=True,
                    )
                chunks.append(chunk)
            if time.monotonic() >= deadline:  # the watchdog may have cut the body short
                raise FetchError(TIMEOUT, f"body not complete within {self.policy.timeout:g}s", transient=True)
            if declared is not None and size < declared:
                raise FetchError(CONNECTION, f"body ended after {size:,} of {declared:,} bytes", transient=True)
        except BaseException:
            if reader is not None:
                bodies.release(reader.taken)
            raise
        finally:
            if reader is not None:
                bodies.done_reading(reader)
        return b"".join(chunks)

    def _opted_out(self, headers: http.client.HTTPMessage) -> bool:
        return any(opts_out(value, self.agents, self.disallowed) for value in headers.get_all("X-Robots-Tag", []))


def opts_out(value: str, agents: set[str], disallowed: set[str]) -> bool:
    """Whether one ``X-Robots-Tag`` header value forbids use by any of ``agents``.

    ``noai, noindex`` applies to every agent; ``someagent: noai`` only to ``someagent``;
    valued directives (``max-image-preview: none``) are not mistaken for agent names.
    """
    head, sep, rest = value.partition(":")
    scope = head.strip().lower()
    if sep and scope and " " not in scope and "," not in scope and scope not in _VALUED_DIRECTIVES:
        if scope not in agents:
            return False
        value = rest
    directives = {part.strip().lower() for part in value.split(",")}
    return bool(directives & disallowed)


def _header_text(value: str) -> str:
    """A header value as its sender meant it: http.client decodes latin-1, servers send UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if it is neither."""
    seconds = _ascii_int(value)
    if seconds is not None or not value:
        return seconds
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value.strip()).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _ascii_int(value: str | None) -> int | None:
    """A header's non-negative decimal integer (ASCII digits only, as HTTP has them), or None."""
    value = (value or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


@dataclass(frozen=True)
class Target:
    """A url taken apart, with the addresses its host resolved to that the policy allows."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]


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
