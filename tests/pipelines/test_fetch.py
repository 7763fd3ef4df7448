"""The guarded fetch: address policy, opt-out parsing, Retry-After, transient classification."""

from __future__ import annotations

import ipaddress
import time

import pytest

from pipelines.fetch import Fetcher, FetchError, FetchPolicy, blocked_category, is_transient_reason, opts_out

DISALLOWED = {"noai", "noimageai", "noindex", "noimageindex"}


@pytest.mark.parametrize("address, category", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "non-global"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.2.3", "private"),
    ("2002:7f00:1::", "loopback"),            # 6to4 wrapping 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),     # NAT64 wrapping 169.254.169.254
    ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
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


@pytest.mark.parametrize("value, opted_out", [
    ("noai", True), ("NoImageAI", True), ("noindex, nofollow", True), ("nofollow, noimageindex", True),
    ("vlmcurate: noai", True), ("VLMCurate: noindex", True),
    ("otherbot: noai", False), ("otherbot: noindex, noimageai", False),
    ("nofollow", False), ("max-image-preview: none", False), ("unavailable_after: 25 Jun 2010 15:00:00 PST", False),
    ("none", False), ("", False),
])
def test_opt_out_directives(value, opted_out):
    assert opts_out(value, "vlmcurate", DISALLOWED) is opted_out


def test_transient_reasons():
    assert all(is_transient_reason(r) for r in ("timeout", "connection", "http_429", "http_500", "http_503"))
    assert not any(is_transient_reason(r) for r in ("http_404", "http_403", "dns", "blocked_address", "opt_out",
                                                      "too_large", "not_an_image"))


@pytest.mark.parametrize("url", [
    "http://2130706434/", "http://0x7f000002/", "http://0177.0.0.2/", "http://127.2/",
    "http://[::ffff:127.0.0.2]/", "http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/", "http://0.0.0.0:80/",
])
def test_private_and_encoded_addresses_are_refused_before_connecting(url):
    fetcher = Fetcher(FetchPolicy(timeout=5, allow_addresses=("127.0.0.1",)))
    start = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetcher.fetch(url)
    fetcher.close()
    assert error.value.reason == "blocked_address", error.value
    assert time.monotonic() - start < 1  # refused at once: no connection attempt, no retry


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "not a url", "http://", "http://a.test:99999/"])
def test_bad_urls(url):
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(FetchError) as error:
        fetcher.fetch(url)
    fetcher.close()
    assert error.value.reason == "bad_url"
