"""Address guard, X-Robots-Tag and robots.txt rules, without any network."""

import asyncio
import ipaddress

import pytest

from vlforge.pipeline.address_guard import (
    ALLOW_ALL_PRIVATE,
    AddressGuard,
    BlockedAddress,
    parse_allowed_networks,
)
from vlforge.pipeline.fetch import is_retryable
from vlforge.pipeline.robots import RobotsCache, x_robots_disallows


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_refused_by_default(address):
    assert not AddressGuard().is_allowed(ipaddress.ip_address(address))


def test_public_address_is_allowed():
    assert AddressGuard().is_allowed(ipaddress.ip_address("93.184.216.34"))


def test_allow_list_opens_only_the_named_networks():
    guard = AddressGuard(parse_allowed_networks(["127.0.0.0/8"]))
    assert guard.is_allowed(ipaddress.ip_address("127.0.0.1"))
    assert not guard.is_allowed(ipaddress.ip_address("169.254.169.254"))
    assert not guard.is_allowed(ipaddress.ip_address("10.0.0.1"))


def test_bare_allow_private_opens_everything():
    assert parse_allowed_networks([]) == ALLOW_ALL_PRIVATE
    assert parse_allowed_networks(None) == ()
    with pytest.raises(ValueError, match="not a network"):
        parse_allowed_networks(["localhost"])


def test_resolve_checks_after_dns():
    # "localhost" is a name, not an address: the guard must look at what it resolves to.
    with pytest.raises(BlockedAddress):
        AddressGuard().resolve("localhost", 80)
    assert AddressGuard(ALLOW_ALL_PRIVATE).resolve("localhost", 80) in ("127.0.0.1", "::1")


@pytest.mark.parametrize(
    ("values", "blocked"),
    [
        (["noai"], True),
        (["noindex, nofollow"], True),
        (["NoImageAI"], True),
        (["vlforge: noimageindex"], True),
        (["otherbot: noai"], False),
        (["nofollow"], False),
        ([], False),
    ],
)
def test_x_robots_tag(values, blocked):
    assert x_robots_disallows(values, "vlforge") is blocked


def _robots(status, text):
    calls = []

    async def fetch(url):
        calls.append(url)
        await asyncio.sleep(0.01)  # a slow server: other requests ask meanwhile
        if isinstance(status, Exception):
            raise status
        return status, text

    return RobotsCache(fetch, "vlforge"), calls


def _allowed(cache: RobotsCache, origin: str, url: str) -> bool:
    return asyncio.run(cache.allowed(origin, url))


def test_robots_txt_rules_and_cache():
    cache, calls = _robots(200, "User-agent: *\nDisallow: /private/\n")

    async def ask_at_once():
        return await asyncio.gather(
            *(cache.allowed("http://h", f"http://h/{d}/a.jpg") for d in ("private", "img") * 5)
        )

    assert asyncio.run(ask_at_once()) == [False, True] * 5
    assert calls == ["http://h/robots.txt"]  # fetched once per origin, however many ask


def test_robots_txt_missing_allows_and_unreachable_disallows():
    assert _allowed(_robots(404, "")[0], "http://h", "http://h/x")
    assert not _allowed(_robots(503, "")[0], "http://h", "http://h/x")
    assert not _allowed(_robots(OSError("down"), "")[0], "http://h", "http://h/x")


def test_retryable_reasons():
    assert all(is_retryable(r) for r in ["timeout", "http_429", "http_503", "connection_error"])
    assert not any(is_retryable(r) for r in ["http_404", "decode_error", "too_large", "http_5"])
