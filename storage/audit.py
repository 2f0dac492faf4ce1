"""The audit trail's shared parts: the DIMSE actions (the node writes them, the API lists
them: one vocabulary, PS3.15 A.5 EventIDs) and the batching writer both processes use."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from storage.access import AccessRepository, AuditEntry

log = logging.getLogger(__name__)

#: DIMSE actions -> (DCM EventID code, EventActionCode C/R/U/D/E).
DIMSE_ACTIONS: Mapping[str, tuple[str, str]] = {
    "dimse.store": ("110107", "C"),  # Import: one event per association that stored
    "dimse.find": ("110112", "E"),  # Query
    "dimse.move": ("110104", "R"),  # DICOM Instances Transferred (to a destination AE)
    "dimse.get": ("110104", "R"),  # DICOM Instances Transferred (back to the caller)
    "dimse.commit": ("110112", "E"),  # Query: "do you hold what I sent?"
    "dimse.refused": ("110114", "E"),  # User Authentication: association rejected
}


#: Worker actions: a different instance under stored UIDs, in another patient's study or
#: another study's series — quarantined, the stored data unchanged (Security Alert).
WORKER_ACTIONS: Mapping[str, tuple[str, str]] = {
    "instance.conflict": ("110113", "E"),
}


def dimse_entry(
    action: str,
    actor: str,
    address: str,
    *,
    outcome: int = 0,
    study_instance_uid: str = "",
    status_code: int | None = None,
    detail: str = "",
    at: dt.datetime | None = None,
    **fields: Any,
) -> AuditEntry:
    """An audit event of the node (actor and address come from the network: bounded and
    stripped of control characters where every row is written, `append_audit`)."""
    code, verb = DIMSE_ACTIONS[action]
    return AuditEntry(
        at=at or dt.datetime.now(dt.UTC),
        action=action,
        event_code=code,
        event_action=verb,
        outcome=outcome,
        actor=actor,
        address=address,
        study_instance_uid=study_instance_uid,
        status_code=status_code,
        detail=detail,
        **fields,
    )


class AuditWriter:
    """Appends audit events from a background thread, in batches (one INSERT of many rows
    every `interval` seconds instead of one transaction per request: the request path only
    queues). Readers of the trail call `flush()` first; `close()` drains at shutdown. A
    failed write keeps the events queued and is retried; only a crash of the process can
    lose the events of the last interval."""

    def __init__(
        self, access: AccessRepository, interval: float = 0.05, max_pending: int = 200_000
    ) -> None:
        self.access, self.interval, self.max_pending = access, interval, max_pending
        self._pending: list[AuditEntry] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, events: list[AuditEntry]) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:  # the database is gone for long: say so
                log.error("audit queue full (%d events): dropping the oldest", len(self._pending))
                del self._pending[: len(events)]
            self._pending.extend(events)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Write everything queued so far (raises if the database refuses)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                self.access.append_audit(batch)
            except BaseException:
                with self._lock:
                    self._pending[:0] = batch
                raise

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            try:
                self.flush()
            except (SQLAlchemyError, OSError) as exc:
                log.error("audit write failed, will retry: %s", type(exc).__name__)
                self._wake.wait(1.0)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except (SQLAlchemyError, OSError) as exc:
            log.error("audit events lost at shutdown: %s", type(exc).__name__)


__all__ = ["DIMSE_ACTIONS", "AuditWriter", "dimse_entry"]
