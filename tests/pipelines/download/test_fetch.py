"""The guarded fetch: address policy, opt-out parsing, Retry-After, transient classification."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest

from pipelines.download.fetch import Fetcher, FetchError, FetchPolicy, is_transient_reason, opts_out
from pipelines.download.netpolicy import blocked_category
from tests.pipelines.download.sockets import record_connections, silent_server

_DEFAULT = Fetcher(FetchPolicy())
AGENTS, DISALLOWED = _DEFAULT.agents, _DEFAULT.disallowed
_DEFAULT.close()


@pytest.mark.parametrize(
    "address, category",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "non-global"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 wrapping 169.254.169.254
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_blocked_categories(address, category):
    assert blocked_category(ipaddress.ip_address(address), []) == category


def test_allow_list_admits_exactly_what_it_names():
    allowed = Fetcher.check_allow_list(["127.0.0.1", "10.1.0.0/16"])
    assert blocked_category(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert blocked_category(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) is None  # same address
    assert blocked_category(ipaddress.ip_address("127.0.0.2"), allowed) == "loopback"
    assert blocked_category(ipaddress.ip_address("10.1.200.3"), allowed) is None
    assert blocked_category(ipaddress.ip_address("10.2.0.1"), allowed) == "private"
    with pytest.raises(ValueError, match="'localhost' is not an IP address or CIDR range"):
        Fetcher.check_allow_list(["localhost"])


@pytest.mark.parametrize(
    "value, opted_out",
    [
        ("noai", True),
        ("NoImageAI", True),
        ("noindex, nofollow", True),
        ("nofollow, noimageindex", True),
        ("vlmcurate: noai", True),
        ("VLMCurate: noindex", True),
        ("img2dataset: noai", True),
        ("otherbot: noai", False),
        ("otherbot: noindex, noimageai", False),
        ("nofollow", False),
        ("max-image-preview: none", False),
        ("unavailable_after: 25 Jun 2010 15:00:00 PST", False),
        ("none", True),
        ("otherbot: none", False),
        ("", False),
    ],
)
def test_opt_out_directives(value, opted_out):
    assert opts_out(value, AGENTS, DISALLOWED) is opted_out


def test_transient_reasons():
    assert all(is_transient_reason(r) for r in ("timeout", "connection", "http_429", "http_500", "http_503"))
    assert not any(
        is_transient_reason(r)
        for r in (
            "http_404",
            "http_403",
            "dns",
            "blocked_address",
            "opt_out",
            "too_large",
            "not_an_image",
            "tls",
            "protocol_error",
            "bad_url",
        )
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706434/",
        "http://0x7f000002/",
        "http://0177.0.0.2/",
        "http://127.2/",
        "http://[::ffff:127.0.0.2]/",
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/",
        "http://0.0.0.0:80/",
    ],
)
def test_private_and_encoded_addresses_are_refused_before_connecting(url, monkeypatch):
    connections, waits = record_connections(monkeypatch), []
    fetcher = Fetcher(FetchPolicy(timeout=5, allow_addresses=("127.0.0.1",)), sleep=waits.append)
    with pytest.raises(FetchError) as error:
        fetcher.fetch(url)
    fetcher.close()
    assert error.value.reason == "blocked_address", error.value
    assert connections == [] and waits == []  # no connection attempt; no wait, so no second attempt


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "not a url", "http://", "http://a.test:99999/"]
)
def test_bad_urls(url):
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(FetchError) as error:
        fetcher.fetch(url)
    fetcher.close()
    assert error.value.reason == "bad_url"


def test_a_silent_tls_server_times_out_within_the_deadline():
    import ssl

    listener, port, accepted = silent_server()
    fetcher = Fetcher(FetchPolicy(timeout=1, retries=0, allow_addresses=("127.0.0.1",)))
    watched, handshakes = [], []  # (socket, deadline) as the watchdog got them; what each handshake started with
    watch = fetcher._watchdog.watch

    def recording_watch(sock, deadline):
        watched.append((sock, deadline))
        return watch(sock, deadline)

    class RecordingTLSSocket(ssl.SSLSocket):
        def do_handshake(self, *args):
            handshakes.append((self, self.gettimeout(), [sock for sock, _ in watched]))
            return super().do_handshake(*args)

    fetcher._watchdog.watch = recording_watch
    fetcher._ssl.sslsocket_class = RecordingTLSSocket
    start = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetcher.fetch(f"https://127.0.0.1:{port}/x.jpg")
    elapsed = time.monotonic() - start
    fetcher.close()
    listener.close()
    assert error.value.reason == "timeout" and accepted
    [(_, deadline), (tls, tls_deadline)] = watched  # the connection's socket, then the TLS one in its place
    [(shaken, timeout, watched_by_then)] = handshakes
    assert shaken is tls and tls in watched_by_then and tls_deadline == deadline  # watched, at the attempt's deadline
    assert 0 < timeout < 1  # the handshake has what is left of the 1 s, not a timeout of its own
    assert elapsed < 30  # the server never answers: only a handshake without a deadline gets here this late


def test_the_next_checked_address_is_tried_when_one_refuses():
    from pipelines.download.fetch import Target

    listener, port, accepted = silent_server("127.0.0.1")
    fetcher = Fetcher(FetchPolicy(allow_addresses=("127.0.0.0/8",)))
    sock = fetcher._connect(Target("http", "dual.test", port, "/", ("127.0.0.2", "127.0.0.1")), time.monotonic() + 30)
    assert sock.getpeername() == ("127.0.0.1", port)
    sock.close()
    fetcher.close()
    listener.close()


def test_slow_names_do_not_starve_the_resolver_and_failures_are_remembered(monkeypatch):
    calls, slow_answered = [], []
    slow_may_answer = threading.Event()  # the slow names hang in the system resolver until this is set

    def getaddrinfo(host, port, *args):
        calls.append(host)
        if host.startswith("slow"):
            slow_may_answer.wait(120)
            slow_answered.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.download.netpolicy import ResolveError, Resolver

    resolver = Resolver([], threads=32)
    hosts = [f"slow{i}.test" for i in range(16)] + [f"fast{i}.test" for i in range(16)]

    def resolve(host):
        # The slow names' callers give up soon; the fast names wait as long as only starvation would make them.
        deadline = time.monotonic() + (0.2 if host.startswith("slow") else 60)
        try:
            return resolver.resolve(host, 80, deadline)
        except ResolveError as e:
            return e.kind

    with ThreadPoolExecutor(32) as pool:
        results = dict(zip(hosts, pool.map(resolve, hosts)))
    assert all(results[f"fast{i}.test"] == ["8.8.8.8"] for i in range(16))
    assert all(results[f"slow{i}.test"] == "timeout" for i in range(16))
    slow_may_answer.set()  # the slow lookups still running finish (as failures) in their threads
    idle = threading.Barrier(32 + 1)
    for _ in range(32):  # queued behind every lookup: all the pool's threads meet here once those are done
        resolver._pool.submit(idle.wait, 60)
    idle.wait(60)
    assert sorted(slow_answered) == sorted(host for host in calls if host.startswith("slow"))  # or never ran
    calls.clear()
    with pytest.raises(ResolveError):
        resolver.resolve("slow0.test", 80, time.monotonic() + 3)  # looked up again: timeouts are not cached
    with pytest.raises(ResolveError) as error:
        resolver.resolve("slow0.test", 80, time.monotonic() + 3)
    assert error.value.kind == "dns" and calls == ["slow0.test"]  # the failure was remembered
    resolver.close()


@pytest.mark.parametrize("url", ["http://[fe80::1%25eth0]/a.jpg", "http://[fe80::1%25nope]/a.jpg"])
def test_scoped_ipv6_literals_are_refused_not_crashing(url):
    fetcher = Fetcher(FetchPolicy(timeout=1))
    with pytest.raises(FetchError) as error:
        fetcher.fetch(url)
    fetcher.close()
    assert error.value.reason in ("blocked_address", "bad_url")


@pytest.mark.parametrize(
    "wrapped",
    [
        "2002:7f00:1::",  # 6to4
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "64:ff9b::7f00:1",  # NAT64
        "::127.0.0.1",  # IPv4-compatible
    ],
)
def test_an_allowed_ipv4_address_does_not_admit_ipv6_addresses_that_wrap_it(wrapped):
    allowed = Fetcher.check_allow_list(["127.0.0.1"])
    address = ipaddress.ip_address(wrapped)
    assert blocked_category(address, allowed) == "loopback"  # the connection would go to another host
    assert blocked_category(address, Fetcher.check_allow_list([wrapped])) is None  # named itself, it may


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("3", 3),
        (" 12 ", 12),
        ("\u00b2", None),
        ("\u0663", None),
        ("-1", None),
        ("1.5", None),
        ("", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),
    ],
)
def test_retry_after_takes_ascii_seconds_or_an_http_date_and_nothing_else(value, seconds):
    from pipelines.download.fetch import retry_after_seconds

    assert retry_after_seconds(value) == seconds


def test_the_oldest_body_may_always_grow_and_the_others_wait_for_room():
    from pipelines.download.fetch import BodyBudget

    budget = BodyBudget(limit=100)
    first, second = budget.reader(), budget.reader()
    assert budget.take(second, 80, time.monotonic() + 60)  # room: taken at once
    assert not budget.take(second, 80, time.monotonic() + 0.05)  # no room, and it is not the oldest
    assert budget.take(first, 500, time.monotonic())  # the oldest reader never waits: progress is certain
    budget.done_reading(first)
    budget.release(first.taken)
    assert budget.take(second, 10, time.monotonic() + 60) and budget.used == 90


def test_a_lookup_hung_in_the_system_resolver_does_not_hold_the_process_at_exit(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "hung_dns.py"
    script.write_text(
        "import socket, time\n"
        "socket.getaddrinfo = lambda *args: time.sleep(120)\n"
        "from pipelines.download.netpolicy import ResolveError, Resolver\n"
        "resolver = Resolver([], threads=4)\n"
        "try:\n"
        "    resolver.resolve('hung.test', 80, time.monotonic() + 0.5)\n"
        "except ResolveError as e:\n"
        "    print(e.kind)\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110)
    assert done.stdout.strip() == "timeout", done.stderr
    assert time.monotonic() - start < 60  # it waited for the 120 s lookup before
