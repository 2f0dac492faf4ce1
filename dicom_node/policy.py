"""Who may associate with the node: calling AE titles and client networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class CallerPolicy:
    """Allowed callers. Empty `calling_ae_titles` means any title from an allowed network."""

    networks: tuple[IPNetwork, ...]
    calling_ae_titles: frozenset[str] = frozenset()

    @classmethod
    def build(cls, networks: Iterable[str], calling_ae_titles: Iterable[str] = ()) -> CallerPolicy:
        return cls(
            tuple(ipaddress.ip_network(n, strict=False) for n in networks),
            frozenset(t.strip() for t in calling_ae_titles if t.strip()),
        )

    def host_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def ae_title_allowed(self, calling_ae_title: str) -> bool:
        return not self.calling_ae_titles or calling_ae_title.strip() in self.calling_ae_titles
