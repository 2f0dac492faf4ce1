"""Storage Commitment Push Model as a modality asks it: pynetdicom as SCU sends N-ACTION and
takes the N-EVENT-REPORT on its own association."""

from __future__ import annotations

import queue
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]


def commitment_request(references: list[tuple[str, str]]) -> Dataset:
    """An N-ACTION request for (SOP Class UID, SOP Instance UID) pairs."""
    request = Dataset()
    request.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    request.ReferencedSOPSequence = Sequence(items)
    return request


def request_commitment(port: int, request: Dataset, calling: str = "CT_SALLE_1") -> tuple[int, Dataset]:
    """(event type, event information) of the report the node sends back."""
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put((event.event_type, event.event_information))
        return 0x0000, None

    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATEWAY",
                         ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert status.Status == 0x0000
        return reports.get(timeout=30)
    finally:
        assoc.release()
