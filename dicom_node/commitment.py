"""Storage Commitment Push Model SCP (PS3.4 Annex J): a modality asks whether the gateway
has taken responsibility for instances it sent; the answer (N-EVENT-REPORT) lists them as
committed — durably in the spool or already in the archive — or failed.

A caller is answered only about what its own site sent: an instance counts as committed
when it is in the spool of the site the caller's C-STOREs are filed under, or archived as
that site's (the index knows each study's owning site, by de-identified UID). Anything else
— another site's instance, an unknown UID — is a failure (0x0112 No such object instance),
so the answer tells no caller what other sites hold.

The report goes back on the requestor's association when it is still open, else on a new
association to the requestor's AE when it is configured (the C-MOVE destinations table).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicom_node.audit import NodeAudit
from dicom_node.policy import Caller, Right
from dicom_node.query import MoveDestination
from imaging import CommitmentStatus

log = logging.getLogger(__name__)

#: The well-known SOP Instance of the Storage Commitment Push Model.
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: FailureReason values (PS3.4 J.3.3.1).
NO_SUCH_OBJECT_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110

#: (original SOP Instance UID, the caller's sites) -> held as one of these sites' instance?
IsStored = Callable[[str, frozenset[str]], bool]
#: Original SOP Instance UID -> committed? (is_stored bound to one caller's sites)
IsCommitted = Callable[[str], bool]


def commitment_report(request: Dataset, is_stored: IsCommitted) -> tuple[int, Dataset]:
    """(EventTypeID, Event Information) for a commitment request: 1 when every instance is
    committed, 2 when some failed."""
    report = Dataset()
    report.TransactionUID = request.TransactionUID
    committed, failed = [], []
    for item in request.get("ReferencedSOPSequence", []):
        reference = Dataset()
        reference.ReferencedSOPClassUID = item.ReferencedSOPClassUID
        reference.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
        try:
            stored = is_stored(str(item.ReferencedSOPInstanceUID))
            reason = NO_SUCH_OBJECT_INSTANCE
        except Exception as exc:  # noqa: BLE001 - the archive is unreachable: not committed
            log.error("storage commitment lookup failed (%s)", type(exc).__name__)
            stored, reason = False, PROCESSING_FAILURE
        if stored:
            committed.append(reference)
        else:
            reference.FailureReason = reason
            failed.append(reference)
    if committed:
        report.ReferencedSOPSequence = Sequence(committed)
    if failed:
        report.FailedSOPSequence = Sequence(failed)
    return (2 if failed else 1), report


class ResponsesSent:
    """Signals, per association, that an N-ACTION response has been sent (EVT_DIMSE_SENT):
    the report must not overtake the response it follows."""

    def __init__(self) -> None:
        self._events: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def event(self, assoc: Any) -> threading.Event:
        with self._lock:
            return self._events.setdefault(id(assoc), threading.Event())

    def on_sent(self, event: Event) -> None:
        if type(event.message).__name__ == "N_ACTION_RSP":
            self.event(event.assoc).set()

    def forget(self, event: Event) -> None:
        """EVT_CONN_CLOSE: the association's signal is no longer needed."""
        with self._lock:
            self._events.pop(id(event.assoc), None)


def handle_commitment(
    event: Event,
    is_stored: IsStored,
    ae_title: str,
    destinations: Mapping[str, MoveDestination],
    responses: ResponsesSent,
    caller_of: Callable[[Any], Caller],
    audit: NodeAudit,
) -> tuple[int, Dataset | None]:
    """N-ACTION (Request Storage Commitment): accept, then report from a thread once the
    N-ACTION response has gone out. Only the caller's own site's instances are committed;
    a caller without the commit right is refused (0x0124)."""
    caller = caller_of(event.assoc)
    if not caller.may(Right.COMMIT):
        audit.record("dimse.commit", caller, CommitmentStatus.NOT_AUTHORIZED)
        return CommitmentStatus.NOT_AUTHORIZED, None
    if event.action_type != 1:
        audit.record("dimse.commit", caller, CommitmentStatus.NO_SUCH_ACTION_TYPE)
        return CommitmentStatus.NO_SUCH_ACTION_TYPE, None
    request = event.action_information
    if "TransactionUID" not in request:
        audit.record("dimse.commit", caller, CommitmentStatus.INVALID_ARGUMENT_VALUE)
        return CommitmentStatus.INVALID_ARGUMENT_VALUE, None
    own_site = frozenset({caller.filing_site})
    assoc = event.assoc
    calling = assoc.requestor.ae_title.strip()
    sent = responses.event(assoc)
    sent.clear()

    def report() -> None:
        event_type, information = commitment_report(
            request, lambda sop_instance_uid: is_stored(sop_instance_uid, own_site)
        )
        # Counts only: the referenced UIDs are the modality's originals.
        committed = len(information.get("ReferencedSOPSequence", []))
        failed = len(information.get("FailedSOPSequence", []))
        audit.record(
            "dimse.commit",
            caller,
            CommitmentStatus.SUCCESS,
            outcome=4 if failed else 0,
            detail={"site": caller.filing_site, "committed": committed, "failed": failed},
        )
        sent.wait(timeout=30)  # the N-ACTION response first
        if assoc.is_established:
            status = assoc.send_n_event_report(
                information, event_type, StorageCommitmentPushModel, COMMITMENT_INSTANCE
            )
            if status and int(getattr(status, "Status", 0xFFFF)) == 0:
                return
        destination = destinations.get(calling)
        if destination is None:
            log.warning("storage commitment: %s left before the report and has no address", calling)
            return
        sender = AE(ae_title=ae_title)
        sender.add_requested_context(StorageCommitmentPushModel)
        # On a new association the report still comes from the Storage Commitment SCP:
        # ask for that role (SCP/SCU role selection).
        other = sender.associate(
            destination.host,
            destination.port,
            ae_title=calling,
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        )
        if other.is_established:
            other.send_n_event_report(
                information, event_type, StorageCommitmentPushModel, COMMITMENT_INSTANCE
            )
            other.release()
        else:
            log.warning("storage commitment: could not reach %s for the report", calling)

    threading.Thread(target=report, name="commitment-report", daemon=True).start()
    return CommitmentStatus.SUCCESS, None


__all__ = [
    "COMMITMENT_INSTANCE",
    "IsStored",
    "ResponsesSent",
    "commitment_report",
    "handle_commitment",
]
