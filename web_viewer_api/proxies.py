"""The client's address behind reverse proxies: X-Forwarded-For is believed only from a
proxy listed in the configuration, and only as far as the chain of listed proxies goes.

The address matters: the audit trail records it and the failure limits count unknown
tokens against it. With no proxy listed (the default) the TCP peer is the client, and a
client's own X-Forwarded-For is ignored: it could name anyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from starlette.types import ASGIApp, Receive, Scope, Send

Network = IPv4Network | IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks ("10.0.0.5", "10.0.0.0/24", "::1"); ValueError for others."""
    return tuple(ip_network(value.strip(), strict=False) for value in values)


def _address(text: str) -> IPv4Address | IPv6Address | None:
    """An address as proxies write it: bare, or with a port ("192.0.2.1:5678",
    "[2001:db8::1]:5678", as some balancers do)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        found = ip_address(text)
    except ValueError:
        return None
    if isinstance(found, IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped  # an IPv4 client seen through an IPv6 socket
    return found


def is_trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    address = _address(peer)
    return address is not None and any(address in network for network in trusted)


def forwarded_client(peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    """The client's address for a request from `peer` carrying `forwarded_for` (the
    X-Forwarded-For values joined by commas): the right-most address that is not itself a
    listed proxy, when the peer is one; the peer otherwise."""
    if not is_trusted(peer, trusted):
        return peer
    client = str(_address(peer))
    for hop in reversed(forwarded_for.split(",")):
        address = _address(hop)
        if address is None:  # not an address: nothing left of it can be believed
            break
        client = str(address)
        if not any(address in network for network in trusted):
            break
    return client


class TrustedProxies:
    """Pure ASGI: rewrites the request's client (scope["client"], the address every route,
    the audit trail and the limits read) from X-Forwarded-For when the peer is a listed
    proxy, and the scheme from X-Forwarded-Proto (http or https only)."""

    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self.app, self.trusted = app, trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and client and is_trusted(client[0], self.trusted):
            headers = scope.get("headers") or []
            forwarded = ",".join(v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for")
            scope = {**scope, "client": (forwarded_client(client[0], forwarded, self.trusted), 0)}
            proto = [
                v.decode("latin-1").strip().lower() for k, v in headers if k == b"x-forwarded-proto"
            ]
            if proto and proto[-1] in ("http", "https"):
                scope["scheme"] = proto[-1]
        await self.app(scope, receive, send)


__all__ = ["TrustedProxies", "forwarded_client", "is_trusted", "parse_networks"]
