"""The DICOM node: a pynetdicom SCP answering C-ECHO and C-STORE, plus the spool sweeper."""

from __future__ import annotations

import copy
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.handlers import (
    AssociationBatches,
    Enqueue,
    handle_connection_closed,
    handle_echo,
    handle_store,
)
from dicom_node.policy import CallerPolicy
from worker import Spool

log = logging.getLogger(__name__)


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
    network_timeout: float = 60.0
    sweep_interval_seconds: float = 30.0
    sweep_after_seconds: float = 300.0
    #: Hand a study's instances to the worker every this many (0: once, at release).
    batch_size: int = 50


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
    """Adds TCP_NODELAY (no delayed-ACK stalls) and the network policy to pynetdicom's server."""

    policy: CallerPolicy

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = super().get_request()
        # Small DIMSE responses otherwise wait for the peer's delayed ACK (~40 ms each).
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if not self.policy.host_allowed(host):
            log.warning("association refused: host %s is not allowed", host)
            return False
        return True


class DicomNode:
    """The running SCP. `start()` binds and returns; `stop()` closes associations and the port."""

    def __init__(self, config: NodeConfig, enqueue: Enqueue) -> None:
        self.config = config
        self.enqueue = enqueue
        self.spool = Spool(config.spool_root, config.site_id)
        self.batches = AssociationBatches()
        self._server: _GatewayAssociationServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.maximum_associations = self.config.maximum_associations
        ae.network_timeout = self.config.network_timeout
        ae.require_called_aet = True
        if self.config.policy.calling_ae_titles:
            ae.require_calling_aet = sorted(self.config.policy.calling_ae_titles)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, list(AllTransferSyntaxes))
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("node not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        # Every batch on disk now predates this process: none is still being received.
        self.sweep_once(older_than_seconds=0)
        ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store,
             [self.spool, self.batches, self.enqueue, self.config.batch_size]),
            (evt.EVT_CONN_CLOSE, handle_connection_closed,
             [self.config.site_id, self.batches, self.enqueue]),
        ]
        server = cast(_GatewayAssociationServer, ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=handlers,
            server_class=_GatewayAssociationServer,
        ))
        server.policy = self.config.policy
        server.contexts = _ContextList(server.contexts)
        ae._servers.append(server)  # pynetdicom's shutdown() expects to find it there
        self._server = server
        serve = threading.Thread(target=server.serve_forever, name="dicom-node", daemon=True)
        serve.start()
        sweeper = threading.Thread(target=self._sweep_loop, name="spool-sweeper", daemon=True)
        sweeper.start()
        self._threads = [serve, sweeper]
        log.info("DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def sweep_once(self, older_than_seconds: float | None = None) -> int:
        """Enqueue spool batches left behind (crash before enqueue, lost task); return count."""
        threshold = self.config.sweep_after_seconds if older_than_seconds is None else older_than_seconds
        stale = self.spool.stale_batches(threshold)
        for batch_id in stale:
            try:
                self.enqueue(self.config.site_id, batch_id)
            except Exception as exc:  # noqa: BLE001 - broker down: try again next sweep
                log.error("sweeper could not enqueue (%s)", type(exc).__name__)
                return 0
        if stale:
            log.info("sweeper re-enqueued %d stale spool batches", len(stale))
        return len(stale)

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.config.sweep_interval_seconds):
            self.sweep_once()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join(timeout=10)
