"""DIMSE status codes the node answers with, named after PS3.4 / PS3.7."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """C-ECHO, C-STORE and Query/Retrieve statuses (PS3.4 Annex B.2.3, C.4; PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: Refused: out of resources (the spool could not be written, or the instance declares
    #: more decoded pixels than the configured limits).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class (or the request's SOP Instance UID).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (the data set cannot be parsed).
    CANNOT_UNDERSTAND = 0xC000
    #: Failure: processing failure (unexpected error in the handler).
    PROCESSING_FAILURE = 0x0110
    #: Query/Retrieve (PS3.4 C.4): a match follows / a sub-operation is under way.
    PENDING = 0xFF00
    #: Matching or sub-operations terminated by a C-CANCEL.
    CANCEL = 0xFE00
    #: Refused: out of resources, unable to perform sub-operations (too many instances).
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    #: Failed: identifier does not match SOP class (missing/invalid keys or level).
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Failed: unable to process.
    UNABLE_TO_PROCESS = 0xC000
    #: N-ACTION (Storage Commitment): unknown action type / missing Transaction UID.
    NO_SUCH_ACTION_TYPE = 0x0123
    INVALID_ARGUMENT_VALUE = 0x0115
    #: Refused: not authorized (PS3.7 C.5 general status): the caller lacks the right for
    #: this service (C-STORE, C-FIND, C-GET, N-ACTION).
    NOT_AUTHORIZED = 0x0124
    #: C-MOVE refused: move destination unknown — also what a caller without the move
    #: right, or naming a destination it may not use, is answered (pynetdicom can refuse a
    #: C-MOVE before its sub-operations with this status only).
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: C-MOVE failed: unable to process (Cxxx) — what a C-MOVE whose identifier cannot be
    #: answered gets: pynetdicom cannot send 0xA900 before the sub-operations and answers
    #: its own 0xC513 once the handler declines to give their number.
    MOVE_UNABLE_TO_PROCESS = 0xC513
