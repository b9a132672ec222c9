"""Refuse private, loopback and link-local destinations (SSRF guard), checked after DNS resolution.

A crawler fed with untrusted URL lists must not be steered into a cluster's metadata service or
internal hosts, so every hop (first request and each redirect) resolves the host, checks every
address, and the connection is then pinned to an address that passed the check (no second DNS
lookup that a rebinding server could answer differently).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_ALL_PRIVATE: tuple[str, ...] = ("0.0.0.0/0", "::/0")


class BlockedAddress(Exception):
    """The host resolves only to addresses the guard refuses."""


class ResolveError(Exception):
    """The host name does not resolve."""


@dataclass(frozen=True)
class AddressGuard:
    """Which non-public networks may be contacted; an empty tuple refuses all of them."""

    allowed_networks: tuple[str, ...] = ()

    def _networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]

    def is_allowed(self, address: IPAddress) -> bool:
        if address.is_global and not address.is_multicast:
            return True
        return any(address in net for net in self._networks() if net.version == address.version)

    def resolve(self, host: str, port: int) -> str:
        """Resolve `host` and return the first address the guard allows; raise otherwise."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise ResolveError(f"cannot resolve {host}: {err}") from err
        addresses: list[IPAddress] = []
        for info in infos:
            raw = info[4][0].split("%", 1)[0]  # drop an IPv6 zone id
            addresses.append(ipaddress.ip_address(raw))
        allowed = [a for a in addresses if self.is_allowed(a)]
        if not allowed:
            raise BlockedAddress(f"{host} resolves to non-public address {addresses[0]}")
        return str(allowed[0])


def parse_allowed_networks(values: Sequence[str] | None) -> tuple[str, ...]:
    """`--allow-private` with no value allows every network; with CIDRs, just those."""
    if values is None:
        return ()
    if len(values) == 0:
        return ALLOW_ALL_PRIVATE
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError as err:
            raise ValueError(
                f"--allow-private: {value!r} is not a network (e.g. 127.0.0.0/8)"
            ) from err
    return tuple(out)
