"""DIMSE statuses as data, one enumeration per service class (PS3.4 B.2.3, C.4.1-3, J.3;
PS3.7 C general statuses), with the names pynetdicom's status tables give them (a test
holds each code to its table). One code can mean two things in two service classes —
0xC000 is "Cannot understand" a data set sent to be stored, and "Unable to process" a
query — so each class has its own names, never aliases of another's.

C-STORE's failures are also STOW-RS's Failure Reasons (PS3.18 Table 10.5.3-2) and the
worker's instance outcomes: `StoreStatus` is theirs too."""

from __future__ import annotations

from enum import IntEnum


class EchoStatus(IntEnum):
    """C-ECHO (Verification, PS3.4 A)."""

    SUCCESS = 0x0000


class StoreStatus(IntEnum):
    """C-STORE (Storage, PS3.4 B.2.3), STOW-RS failure reasons, the worker's outcomes."""

    SUCCESS = 0x0000
    #: Failure: processing failure (an unexpected error).
    PROCESSING_FAILURE = 0x0110
    #: Failure: duplicate SOP Instance (a different instance under stored UIDs).
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: Refused: not authorized — the caller lacks the right to store (or the instance may
    #: not leave the site: its pixels may show identity).
    NOT_AUTHORIZED = 0x0124
    #: Refused: out of resources (the spool could not be written, or the instance declares
    #: more decoded pixels than the configured limits).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class (or the request's SOP Instance UID).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (the data set cannot be parsed).
    CANNOT_UNDERSTAND = 0xC000


class QueryRetrieveStatus(IntEnum):
    """C-FIND, C-MOVE, C-GET (Query/Retrieve, PS3.4 C.4.1-3)."""

    SUCCESS = 0x0000
    #: A match follows / a sub-operation is under way.
    PENDING = 0xFF00
    #: Matching or sub-operations terminated by a C-CANCEL.
    CANCEL = 0xFE00
    #: Refused: not authorized (the caller lacks the right for this service).
    NOT_AUTHORIZED = 0x0124
    #: Refused: out of resources, unable to perform sub-operations (too many instances).
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    #: C-MOVE refused: move destination unknown — also what a caller without the move
    #: right, or naming a destination it may not use, is answered (pynetdicom can refuse a
    #: C-MOVE before its sub-operations with this status only).
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: Failed: identifier does not match SOP class (missing/invalid keys or level).
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Failed: unable to process (the node could not answer).
    UNABLE_TO_PROCESS = 0xC000
    #: C-MOVE failed: unable to process — what a C-MOVE whose identifier cannot be
    #: answered gets: pynetdicom cannot send 0xA900 before the sub-operations and answers
    #: its own 0xC513 once the handler declines to give their number.
    MOVE_UNABLE_TO_PROCESS = 0xC513


class CommitmentStatus(IntEnum):
    """N-ACTION of Storage Commitment (PS3.4 J.3)."""

    SUCCESS = 0x0000
    INVALID_ARGUMENT_VALUE = 0x0115
    NO_SUCH_ACTION_TYPE = 0x0123
    NOT_AUTHORIZED = 0x0124


__all__ = ["CommitmentStatus", "EchoStatus", "QueryRetrieveStatus", "StoreStatus"]
