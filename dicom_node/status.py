"""DIMSE status codes the node answers with, named after PS3.4 / PS3.7."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """C-ECHO and C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: Refused: out of resources (the spool could not be written).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class (or the request's SOP Instance UID).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (the data set cannot be parsed).
    CANNOT_UNDERSTAND = 0xC000
    #: Failure: processing failure (unexpected error in the handler).
    PROCESSING_FAILURE = 0x0110
