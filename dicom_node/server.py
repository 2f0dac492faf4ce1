"""The DICOM node: a pynetdicom SCP answering C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET and
Storage Commitment for the callers its policy admits. (Batches it could not hand to the
worker are the workers' recovery loop's: `worker.recovery`.)"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from prometheus_client import start_http_server
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit import NodeAudit
from dicom_node.backlog import SpoolBacklog
from dicom_node.commitment import IsStored, ResponsesSent, handle_commitment
from dicom_node.handlers import (
    AssociationBatches,
    Enqueue,
    SiteSpools,
    caller_of,
    handle_connection_closed,
    handle_echo,
    handle_store,
)
from dicom_node.metrics import NodeMetrics
from dicom_node.policy import Caller, CallerPolicy
from dicom_node.query import MoveDestination, handle_find, handle_get, handle_move
from dicom_node.receive import ReceiveFolder, remove_left_by_dead_nodes
from imaging import DEFAULT_DECODE_LIMITS, DecodeLimits, StoreStatus
from storage import AccessRepository, AuditWriter, IndexRepository, ObjectStore, QueryRetrieve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """DICOM over TLS (PS3.15 Annex B, BCP 195: TLS 1.2 or newer)."""

    certificate: Path
    private_key: Path
    #: CA certificates to verify client certificates; with `require_client_certificate`
    #: only callers holding a certificate signed by them may associate.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.certificate), str(self.private_key))
        if self.ca_certificates is not None:
            context.load_verify_locations(cafile=str(self.ca_certificates))
        # With CA certificates, a certificate the caller offers is verified (its subject can
        # then bind an AE title, see CallerCredential) even when none is required.
        context.verify_mode = (
            ssl.CERT_REQUIRED
            if self.require_client_certificate
            else ssl.CERT_OPTIONAL
            if self.ca_certificates is not None
            else ssl.CERT_NONE
        )
        return context


@dataclass(frozen=True)
class NodeConfig:
    """What the node needs, handed in by the composition root."""

    ae_title: str
    host: str
    port: int
    site_id: str
    spool_root: Path
    policy: CallerPolicy
    max_pdu_size: int = 262_144
    maximum_associations: int = 32
    #: Connections one client address may hold at once (the rest of the slots stay free for
    #: other callers); more are closed as they arrive.
    max_associations_per_address: int = 8
    #: ARTIM: a connection that has not sent its A-ASSOCIATE-RQ (or finished its TLS
    #: handshake) within this many seconds is closed.
    association_request_timeout: float = 10.0
    network_timeout: float = 60.0
    #: Hand a study's instances to the worker every this many (0: once, at release).
    batch_size: int = 10
    #: C-MOVE destinations by AE title (empty: C-MOVE answers "destination unknown").
    move_destinations: Mapping[str, MoveDestination] = field(default_factory=dict)
    #: DICOM over TLS on this port instead of plain TCP.
    tls: TlsConfig | None = None
    #: Serve the node's Prometheus metrics on this port (same host); None: not served.
    metrics_port: int | None = None
    #: Calling AE title -> the site its studies belong to (spool, pseudonym qualifier,
    #: index); callers not listed belong to `site_id`.
    calling_ae_sites: Mapping[str, str] = field(default_factory=dict)
    #: Largest decoded pixel data an instance may declare (above: refused, 0xA700).
    decode_limits: DecodeLimits = DEFAULT_DECODE_LIMITS
    #: Instances the spool may hold before C-STORE answers wait for the worker to drain it
    #: (flow control, see `dicom_node.backlog`); 0: never wait.
    backlog_limit: int = 1000


class _ContextList(list[PresentationContext]):
    """Supported contexts that copy in ~1 ms instead of ~60 ms.

    pynetdicom deep-copies the server's contexts for every association; with every storage
    class times every transfer syntax that is most of an association's set-up time. UIDs are
    immutable, so a shallow copy of each context with its own transfer-syntax list is as
    safe as a deep copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class _GatewayAssociationServer(ThreadedAssociationServer):
    """Adds to pynetdicom's server: TCP_NODELAY (no delayed-ACK stalls), the network
    policy, a per-address connection limit, and the TLS handshake in the connection's own
    thread, bounded by ARTIM (pynetdicom's runs in the accepting thread, unbounded: one
    silent client stalled every other)."""

    policy: CallerPolicy
    max_per_address: int
    handshake_timeout: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: dict[str, int] = {}
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = cast(socket.socket, self.socket).accept()
        # Small DIMSE responses otherwise wait for the peer's delayed ACK (~40 ms each).
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def _open_from(self, host: str) -> int:
        """Connections of `host`: being set up, or running an association."""
        running = 0
        for association in self.active_associations:
            info = getattr(association.requestor, "address_info", None)
            running += info is not None and info.address == host
        return self._pending.get(host, 0) + running

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if not self.policy.host_allowed(host):
            log.warning("association refused: host %s is not allowed", host)
            return False
        with self._pending_lock:
            if self._open_from(host) >= self.max_per_address:
                log.warning(
                    "connection refused: %s already holds %d connections",
                    host,
                    self.max_per_address,
                )
                return False
            self._pending[host] = self._pending.get(host, 0) + 1
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (bounded), then the association
        (pynetdicom starts its thread and returns)."""
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ValueError) as exc:  # SSLError, timeout, reset
                    log.warning("TLS handshake with %s failed (%s)", host, type(exc).__name__)
                    self.shutdown_request(request)
                    return
            super().finish_request(request, client_address)
        finally:
            with self._pending_lock:
                self._pending[host] -= 1
                if not self._pending[host]:
                    del self._pending[host]


#: Query/Retrieve information models: SOP Class UID -> model ("PATIENT" or "STUDY" root).
QUERY_RETRIEVE_MODELS: dict[str, str] = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
}


def _model(event: Event) -> str:
    return QUERY_RETRIEVE_MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")


def peer_certificate_subject(assoc: Any) -> str | None:
    """The RFC 4514 subject of the verified client certificate of a TLS association."""
    connection = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(connection, ssl.SSLSocket):
        return None
    der = connection.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def _find(
    event: Event,
    service: QueryRetrieve,
    ae_title: str,
    metrics: NodeMetrics,
    callers: Any,
    audit: NodeAudit,
) -> Any:
    metrics.query("C-FIND")
    return handle_find(event, service, _model(event), ae_title, callers(event.assoc), audit)


def _move(
    event: Event,
    service: QueryRetrieve,
    store: ObjectStore,
    destinations: Mapping[str, MoveDestination],
    metrics: NodeMetrics,
    callers: Any,
    audit: NodeAudit,
) -> Any:
    metrics.query("C-MOVE")
    return handle_move(
        event, service, store, _model(event), destinations, callers(event.assoc), audit
    )


def _get(
    event: Event,
    service: QueryRetrieve,
    store: ObjectStore,
    metrics: NodeMetrics,
    callers: Any,
    audit: NodeAudit,
) -> Any:
    metrics.query("C-GET")
    return handle_get(event, service, store, _model(event), callers(event.assoc), audit)


class DicomNode:
    """The running SCP. `start()` binds and returns; `stop()` closes associations and the port."""

    def __init__(
        self,
        config: NodeConfig,
        enqueue: Enqueue,
        index: IndexRepository | None = None,
        store: ObjectStore | None = None,
        archived: IsStored | None = None,
        audit: AuditWriter | None = None,
        pseudonymize_uid: Callable[[str], str] | None = None,
    ) -> None:
        """`index` and `store` (the de-identified archive) enable C-FIND, C-MOVE and C-GET;
        `archived` ((original SOP Instance UID, sites) -> archived as one of these sites'?)
        enables Storage Commitment: an instance is committed when it is in the caller's
        site's spool or archived as that site's. Audit events go to `audit`, by default
        to the index database's audit trail (none without an index); `pseudonymize_uid`
        (the keyed UID mapping of the site's de-identification) names the studies of
        C-STORE events."""
        self.config = config
        self.enqueue = enqueue
        self.index, self.store = index, store
        self.archived = archived
        self._responses = ResponsesSent()
        if audit is None and index is not None:
            audit = AuditWriter(AccessRepository(index.engine))
        self.audit = NodeAudit(audit)
        self.pseudonymize_uid = pseudonymize_uid
        self.spools = SiteSpools(config.spool_root, config.site_id, config.calling_ae_sites)
        self.spool = self.spools.default
        self.metrics = NodeMetrics(config.site_id)
        self.batches = AssociationBatches(self.metrics)
        self.backlog = SpoolBacklog(config.spool_root, config.backlog_limit)
        #: Where pynetdicom writes the data sets being received (set at start).
        self.receive: ReceiveFolder | None = None
        self.metrics.backlog.set_function(lambda: self.backlog.count)
        self._metrics_server: Any = None
        self._server: _GatewayAssociationServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.maximum_associations = self.config.maximum_associations
        ae.network_timeout = self.config.network_timeout
        ae.acse_timeout = self.config.association_request_timeout
        ae.require_called_aet = True
        if self.config.policy.calling_ae_titles:
            ae.require_calling_aet = sorted(self.config.policy.admitted_ae_titles)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                # Roles: a C-GET requestor asks to be the Storage SCP on its own association.
                ae.add_supported_context(
                    context.abstract_syntax, list(AllTransferSyntaxes), scu_role=True, scp_role=True
                )
        if self.index is not None:
            for sop_class in QUERY_RETRIEVE_MODELS:
                ae.add_supported_context(sop_class)
        if self.archived is not None:
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        return ae

    def is_stored(self, sop_instance_uid: str, site_ids: frozenset[str]) -> bool:
        """Storage Commitment: durably spooled here for one of `site_ids`, or already in the
        archive as one of theirs."""
        return self.spools.holds(sop_instance_uid, site_ids) or bool(
            self.archived is not None and self.archived(sop_instance_uid, site_ids)
        )

    def caller(self, assoc: Any) -> Caller:
        """The credentials of an association's calling AE."""
        return caller_of(assoc, self.config.policy, self.spools.site_for(assoc.requestor.ae_title))

    def _on_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ: a calling AE title outside `DICOM__ALLOWED_CALLING_AE_TITLES`,
        or bound to a client certificate subject the peer did not show, is rejected (calling
        AE title not recognised) and the attempt audited. Fails closed: an error rejects."""
        assoc = event.assoc
        title = ""
        try:
            # pynetdicom fills requestor.ae_title only after this event: read the request
            primitive = assoc.requestor.primitive
            title = str(primitive.calling_ae_title).strip() if primitive is not None else ""
            if not self.config.policy.ae_title_allowed(title):
                reason = "calling AE title not allowed"
            elif self.config.policy.certificate_matches(title, peer_certificate_subject(assoc)):
                return
            else:
                reason = "client certificate subject does not match"
        except Exception as exc:  # noqa: BLE001 - pynetdicom would log it and go on: refuse
            reason = f"certificate check failed ({type(exc).__name__})"
        log.warning("association rejected: calling AE %s: %s", title, reason)
        caller = self.config.policy.caller(
            title, str(assoc.requestor.address), self.spools.site_for(title)
        )
        self.audit.record(
            "dimse.refused", caller, StoreStatus.NOT_AUTHORIZED, detail={"reason": reason}
        )
        # Rejected-permanent, service-user, calling AE title not recognised (PS3.8 9.3.4).
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()  # as pynetdicom's own rejections: lets the reject go out, then closes

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("node not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        # Received data sets go to a temporary file as they arrive, never whole in memory
        # (a process-wide pynetdicom setting: the node owns its process).
        _config.STORE_RECV_CHUNKED_DATASET = True
        # ... in the spool's receive folder; what a killed node left there goes first.
        remove_left_by_dead_nodes(self.config.spool_root)
        self.receive = ReceiveFolder(self.config.spool_root)
        self.receive.install()
        # Batches a previous node left (killed mid-association, or the broker down at the
        # hand-over) are the workers' recovery loop's: unclaimed, unrecorded, sent again.
        ae = self._build_ae()
        policy = self.config.policy
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, handle_echo),
            (
                evt.EVT_C_STORE,
                handle_store,
                [
                    self.spools,
                    self.batches,
                    self.enqueue,
                    self.config.batch_size,
                    policy,
                    self.config.decode_limits,
                    self.backlog,
                    self.receive,
                ],
            ),
            (
                evt.EVT_CONN_CLOSE,
                handle_connection_closed,
                [
                    self.config.site_id,
                    self.batches,
                    self.enqueue,
                    policy,
                    self.audit,
                    self.pseudonymize_uid,
                ],
            ),
        ]
        if self.archived is not None:
            handlers += [
                (
                    evt.EVT_N_ACTION,
                    handle_commitment,
                    [
                        self.is_stored,
                        self.config.ae_title,
                        self.config.move_destinations,
                        self._responses,
                        self.caller,
                        self.audit,
                    ],
                ),
                (evt.EVT_DIMSE_SENT, self._responses.on_sent),
                (evt.EVT_CONN_CLOSE, self._responses.forget),
            ]
        if self.index is not None and self.store is not None:
            service = QueryRetrieve(self.index)
            handlers += [
                (
                    evt.EVT_C_FIND,
                    _find,
                    [service, self.config.ae_title, self.metrics, self.caller, self.audit],
                ),
                (
                    evt.EVT_C_MOVE,
                    _move,
                    [
                        service,
                        self.store,
                        self.config.move_destinations,
                        self.metrics,
                        self.caller,
                        self.audit,
                    ],
                ),
                (evt.EVT_C_GET, _get, [service, self.store, self.metrics, self.caller, self.audit]),
            ]
        server = cast(
            _GatewayAssociationServer,
            ae.make_server(
                (self.config.host, self.config.port),
                ssl_context=self.config.tls.context() if self.config.tls else None,
                evt_handlers=handlers,
                server_class=_GatewayAssociationServer,
            ),
        )
        server.policy = self.config.policy
        server.max_per_address = self.config.max_associations_per_address
        server.handshake_timeout = self.config.association_request_timeout
        server.contexts = _ContextList(server.contexts)
        ae._servers.append(server)  # pynetdicom's shutdown() expects to find it there
        self._server = server
        serve = threading.Thread(target=server.serve_forever, name="dicom-node", daemon=True)
        serve.start()
        counter = threading.Thread(
            target=self.backlog.run, args=(self._stopping,), name="spool-backlog", daemon=True
        )
        counter.start()
        self._threads = [serve, counter]
        if self.config.metrics_port is not None:
            self._metrics_server, _ = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=self.metrics.registry
            )
        log.info(
            "DICOM node %s listening on %s:%d%s",
            self.config.ae_title,
            self.config.host,
            self.port,
            " (TLS)" if self.config.tls else "",
        )

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Graceful stop: no new association is accepted, the open ones may finish (up to
        `drain_seconds`, then they are aborted: what they were acknowledged is on disk)."""
        self._stopping.set()
        if self._server is not None:
            server = self._server
            server.shutdown()  # stops accepting; running associations go on
            deadline = time.monotonic() + drain_seconds
            while time.monotonic() < deadline and any(
                a.is_alive() for a in server.active_associations
            ):
                time.sleep(0.05)
            for association in server.active_associations:
                if association.is_alive():
                    association.abort()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.receive is not None:
            self.receive.remove()
        self.audit.close()
        for thread in self._threads:
            thread.join(timeout=10)
