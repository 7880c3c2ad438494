"""Where webhooks may be delivered: a guard against server-side request forgery.

An administrator types a subscription's URL, and the aggregator then POSTs to it from inside
the city's network. Without a check that URL could name the aggregator's own loopback services
(the ingest metrics port, PostgreSQL), a neighbour on a private network, or a cloud's metadata
service (169.254.169.254). So by default a destination must be a public address: a URL whose
host is, or resolves to, a loopback, private (RFC 1918, IPv6 ULA), link-local, shared (CGNAT),
multicast, reserved or unspecified address is refused, unless it matches the allow-list
(``CWG_WEBHOOKS__ALLOW_NETWORKS``: CIDRs, addresses or host names).

The check runs twice: when a subscription is made or changed (the API answers 422), and before
every delivery, because what a name resolves to can change after it was checked (DNS
rebinding). At delivery the request goes to the very address that was checked
(``Destination``), with the original host in ``Host`` and, for https, in the TLS server name,
so the certificate is still verified against the name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "AllowList",
    "Destination",
    "RefusedDestinationError",
    "Resolver",
    "check_destination",
    "parse_allow_entry",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port → the addresses it resolves to (socket.getaddrinfo by default; tests hand their own)
Resolver: TypeAlias = Callable[[str, int], Sequence[str]]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# RFC 6598 shared address space (carrier-grade NAT): not public, and not in is_private on 3.11
_SHARED: Final = ipaddress.ip_network("100.64.0.0/10")


class RefusedDestinationError(ValueError):
    """The URL's host is not a public address and the allow-list does not name it. The
    message says why in words an administrator can act on; it never holds the URL's path,
    query or credentials (they may carry a receiver's token)."""


def parse_allow_entry(entry: str) -> IPNetwork | str:
    """One allow-list entry: a network (``10.2.0.0/16``), an address (``192.0.2.7``) or a
    host name (``hooks.city.example``, matched exactly, case-insensitively)."""
    text = entry.strip()
    if not text:
        raise ValueError("an empty allow-list entry")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or not all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    ):
        raise ValueError(f"not a network, address or host name: {entry!r}")
    return name


@dataclass(frozen=True, slots=True)
class AllowList:
    """The destinations allowed although not public."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in entries:
            parsed = parse_allow_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        return cls(tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


def _why_not_public(address: IPAddress) -> str | None:
    """Why an address is not a public destination; None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _why_not_public(address.ipv4_mapped)  # ::ffff:127.0.0.1 is loopback
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked URL: ``url`` names the checked address instead of the host; ``host_header``
    and ``server_name`` keep the name the receiver expects (``server_name`` for TLS, None for
    http)."""

    url: str
    host_header: str
    server_name: str | None
    address: str


def check_destination(url: str, allow: AllowList, resolve: Resolver | None = None) -> Destination:
    """Check ``url`` against the rules above and pin it to an address that passed; raises
    ``RefusedDestinationError``. Every address the host resolves to must pass (a name that
    resolves to one public and one private address is refused: which one a client picks is
    not ours to choose)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise RefusedDestinationError("only http and https destinations are allowed")
    host = parts.hostname
    if not host:
        raise RefusedDestinationError("the URL has no host")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise RefusedDestinationError("the URL's port is not a number from 0 to 65535") from exc
    by_name = allow.allows_host(host)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            found = (resolve or _resolve)(host, port)
        except (OSError, UnicodeError) as exc:
            raise RefusedDestinationError(f"the host {host} does not resolve") from exc
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
        if not addresses:
            raise RefusedDestinationError(f"the host {host} does not resolve")
    for address in addresses:
        why = _why_not_public(address)
        if why is not None and not by_name and not allow.allows(address):
            shown = host if literal is not None else f"{host} ({address})"
            raise RefusedDestinationError(
                f"the destination {shown} is a {why} address; only public addresses are "
                "allowed unless CWG_WEBHOOKS__ALLOW_NETWORKS names it"
            )
    chosen = addresses[0]
    netloc = f"[{chosen}]" if chosen.version == 6 else str(chosen)
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:  # a receiver's user:password, sent as basic authentication as before
        netloc = f"{userinfo}@{netloc}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != _DEFAULT_PORTS[scheme]:
        host_header += f":{parts.port}"
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    return Destination(
        url=pinned,
        host_header=host_header,
        server_name=host if scheme == "https" and literal is None else None,
        address=str(chosen),
    )
