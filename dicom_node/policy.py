"""Who may associate with the node (calling AE titles and client networks), and what each
caller may do there: its sites and its rights (the DIMSE side of the access policy)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from storage import AccessScope

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


class Right(StrEnum):
    """What a DIMSE caller may ask of the node."""

    STORE = "store"  # C-STORE (into the site its C-STOREs are filed under)
    FIND = "find"  # C-FIND
    MOVE = "move"  # C-MOVE (to a configured destination)
    GET = "get"  # C-GET (back to the caller, on its own association)
    COMMIT = "commit"  # Storage Commitment (N-ACTION)


ALL_RIGHTS: frozenset[Right] = frozenset(Right)


@dataclass(frozen=True)
class CallerCredential:
    """A configured caller: the sites whose studies it may query and retrieve (None: every
    site), its rights and, with TLS, the subject its client certificate must carry."""

    site_ids: frozenset[str] | None
    rights: frozenset[Right]
    #: RFC 4514 subject (e.g. "CN=pacs-a,O=Hospital A"): the AE title is honoured only on
    #: a TLS association whose verified client certificate has exactly this subject.
    certificate_subject: str | None = None
    #: C-MOVE destinations (AE titles) it may name; None: any configured destination.
    move_destinations: frozenset[str] | None = None


@dataclass(frozen=True)
class Caller:
    """The calling AE of one association, as the node treats it."""

    ae_title: str
    address: str
    #: The site its C-STOREs are filed under (spool, pseudonym qualifier, owner in the index).
    filing_site: str
    #: Sites it may query and retrieve; None: every site.
    site_ids: frozenset[str] | None
    rights: frozenset[Right]
    listed: bool
    move_destinations: frozenset[str] | None = None

    @property
    def actor(self) -> str:
        """The audit trail's user id."""
        return f"ae:{self.ae_title}"

    @property
    def scope(self) -> AccessScope:
        """The same scope a site-restricted API key gets on QIDO/WADO."""
        return AccessScope(site_ids=self.site_ids)

    def may(self, right: Right) -> bool:
        return right in self.rights

    def may_move_to(self, destination_ae_title: str) -> bool:
        return self.move_destinations is None or destination_ae_title in self.move_destinations


@dataclass(frozen=True)
class CallerPolicy:
    """Allowed callers. Empty `calling_ae_titles` means any title from an allowed network.

    `callers` maps calling AE titles to their credentials; a caller not listed gets
    `unlisted_rights` over the one site its C-STOREs are filed under."""

    networks: tuple[IPNetwork, ...]
    calling_ae_titles: frozenset[str] = frozenset()
    callers: Mapping[str, CallerCredential] = field(default_factory=dict)
    unlisted_rights: frozenset[Right] = ALL_RIGHTS

    @classmethod
    def build(
        cls,
        networks: Iterable[str],
        calling_ae_titles: Iterable[str] = (),
        callers: Mapping[str, CallerCredential] | None = None,
        unlisted_rights: Iterable[Right | str] = ALL_RIGHTS,
    ) -> CallerPolicy:
        return cls(
            tuple(ipaddress.ip_network(n, strict=False) for n in networks),
            frozenset(t.strip() for t in calling_ae_titles if t.strip()),
            {ae.strip(): credential for ae, credential in (callers or {}).items()},
            frozenset(Right(r) for r in unlisted_rights),
        )

    def host_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    @property
    def admitted_ae_titles(self) -> frozenset[str]:
        """The allowed calling AE titles and the configured callers' (a caller configured
        with rights is meant to connect)."""
        return self.calling_ae_titles | frozenset(self.callers)

    def ae_title_allowed(self, calling_ae_title: str) -> bool:
        """Any title when no list is configured; else a listed or configured caller's."""
        return not self.calling_ae_titles or calling_ae_title.strip() in self.admitted_ae_titles

    def certificate_matches(self, calling_ae_title: str, certificate_subject: str | None) -> bool:
        """False when the AE title is bound to a certificate subject the peer did not show."""
        credential = self.callers.get(calling_ae_title.strip())
        if credential is None or credential.certificate_subject is None:
            return True
        return certificate_subject == credential.certificate_subject

    def caller(self, calling_ae_title: str, address: str, filing_site: str) -> Caller:
        """The credentials of a calling AE (`filing_site`: where its C-STOREs go)."""
        title = calling_ae_title.strip()
        credential = self.callers.get(title)
        if credential is None:
            return Caller(
                title,
                address,
                filing_site,
                frozenset({filing_site}),
                self.unlisted_rights,
                listed=False,
            )
        return Caller(
            title,
            address,
            filing_site,
            credential.site_ids,
            credential.rights,
            listed=True,
            move_destinations=credential.move_destinations,
        )


__all__ = [
    "ALL_RIGHTS",
    "LOOPBACK_NETWORKS",
    "Caller",
    "CallerCredential",
    "CallerPolicy",
    "IPNetwork",
    "Right",
]
