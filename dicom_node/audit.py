"""The node's rows in the audit trail (the table the API writes and `/api/audit` lists):
who (actor `ae:<calling AE>`), from where, which de-identified studies, what outcome.

One event per study the operation concerned (the study's own row: `/api/audit` shows a
site-limited admin the events about its sites' studies), or one without a study when it
concerned none. Nothing here ever holds an original UID or identifier: C-FIND/C-MOVE/C-GET
events name the studies the index returned (de-identified), never the values the caller
sent; C-STORE events name the pseudonymized studies (the keyed UID the worker will give
them) and counts; Storage Commitment events carry counts only. Writes are queued to a
background thread: an audit failure never fails or slows a DIMSE operation."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

from dicom_node.policy import Caller
from imaging import CommitmentStatus, QueryRetrieveStatus, StoreStatus
from storage import AuditWriter, dimse_entry

log = logging.getLogger(__name__)

#: Events (one per study) one operation writes at most; a last one without a study then
#: counts the studies not named (the total is in every event's detail).
MAX_STUDIES_LISTED = 500

#: Statuses the caller caused, by audited action (EventOutcomeIndicator 4, minor failure:
#: refused); the same code can be the node's failure in another service class (0xC000).
_QUERY_REFUSALS = frozenset(
    {
        QueryRetrieveStatus.NOT_AUTHORIZED,
        QueryRetrieveStatus.MOVE_DESTINATION_UNKNOWN,
        QueryRetrieveStatus.MOVE_UNABLE_TO_PROCESS,
        QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    }
)
_REFUSALS: Mapping[str, frozenset[int]] = {
    "dimse.store": frozenset(
        {
            StoreStatus.NOT_AUTHORIZED,
            StoreStatus.CANNOT_UNDERSTAND,
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        }
    ),
    "dimse.find": _QUERY_REFUSALS,
    "dimse.move": _QUERY_REFUSALS,
    "dimse.get": _QUERY_REFUSALS,
    "dimse.commit": frozenset(
        {
            CommitmentStatus.NOT_AUTHORIZED,
            CommitmentStatus.NO_SUCH_ACTION_TYPE,
            CommitmentStatus.INVALID_ARGUMENT_VALUE,
        }
    ),
    "dimse.refused": frozenset({StoreStatus.NOT_AUTHORIZED}),
}


def outcome_of(action: str, status: int) -> int:
    """EventOutcomeIndicator of an action's final DIMSE status: 0 success (or cancelled by
    the caller), 4 refused, 8 the node failed."""
    if status in (0x0000, QueryRetrieveStatus.CANCEL):
        return 0
    return 4 if status in _REFUSALS.get(action, frozenset()) else 8


class NodeAudit:
    """Queues the node's audit events; without a writer (a node without an index) it
    records nothing."""

    def __init__(self, writer: AuditWriter | None = None) -> None:
        self.writer = writer

    def record(
        self,
        action: str,
        caller: Caller,
        status: int,
        *,
        studies: Collection[str] = (),
        outcome: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        if self.writer is None:
            return
        try:
            listed = sorted(studies)
            notes: dict[str, Any] = {
                "calling_ae": caller.ae_title,
                "status": f"0x{status:04X}",
                "caller_sites": sorted(caller.site_ids) if caller.site_ids is not None else "*",
                "studies_total": len(listed),
                **(detail or {}),
            }
            text = json.dumps(notes)
            named: list[str] = listed[:MAX_STUDIES_LISTED] or [""]
            if len(listed) > MAX_STUDIES_LISTED:
                named.append("")  # the studies beyond: counted in the detail
            code = outcome_of(action, status) if outcome is None else outcome
            self.writer.submit(
                [
                    dimse_entry(
                        action,
                        caller.actor,
                        caller.address,
                        outcome=code,
                        study_instance_uid=study,
                        status_code=int(status),
                        detail=text,
                    )
                    for study in named
                ]
            )
        except Exception as exc:  # noqa: BLE001 - the audit never fails a DIMSE operation
            log.error("audit event %s not recorded (%s)", action, type(exc).__name__)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = ["MAX_STUDIES_LISTED", "NodeAudit", "outcome_of"]
