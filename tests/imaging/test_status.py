"""DIMSE statuses per service class (imaging.status): each code is one pynetdicom's table of
that service class (or the general statuses) names, with a name that says the same, and no
class has aliases — the audit's outcome depends on the service: 0xC000 is the caller's bad
data set on a C-STORE, the node's failure on a C-FIND."""

from __future__ import annotations

import re
from enum import IntEnum

import pynetdicom.status as tables
import pytest

from dicom_node.audit import outcome_of
from imaging import CommitmentStatus, EchoStatus, QueryRetrieveStatus, StoreStatus

CLASSES: list[tuple[type[IntEnum], dict[int, tuple[str, str]]]] = [
    (EchoStatus, tables.VERIFICATION_SERVICE_CLASS_STATUS),
    (StoreStatus, tables.STORAGE_SERVICE_CLASS_STATUS),
    (QueryRetrieveStatus, {**tables.QR_FIND_SERVICE_CLASS_STATUS, **tables.QR_MOVE_SERVICE_CLASS_STATUS,
                           **tables.QR_GET_SERVICE_CLASS_STATUS}),
    (CommitmentStatus, tables.STORAGE_COMMITMENT_SERVICE_CLASS_STATUS),
]


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z]+", text.lower().replace("authorised", "authorized"))
            if len(w) > 3 and w not in {"refused", "failure", "sub", "operations"}}


@pytest.mark.parametrize(("enum", "table"), CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_each_status_is_its_service_class_s_and_named_as_the_standard_names_it(
        enum: type[IntEnum], table: dict[int, tuple[str, str]]) -> None:
    assert len(enum.__members__) == len(list(enum)), "an alias hides a name"
    for member in enum:
        category, meaning = table.get(int(member)) or tables.GENERAL_STATUS[int(member)]
        if category in ("Pending", "Cancel"):
            assert member.name == category.upper()
        elif meaning:  # our name shares the standard's words ("Success" has none to share)
            assert _words(member.name.replace("_", " ")) & _words(meaning), (member.name, meaning)
        assert (category == "Success") == (member == 0)


def test_the_audit_outcome_depends_on_the_service_class() -> None:
    assert outcome_of("dimse.store", StoreStatus.CANNOT_UNDERSTAND) == 4  # the caller's data
    assert outcome_of("dimse.find", QueryRetrieveStatus.UNABLE_TO_PROCESS) == 8  # the node's failure
    assert outcome_of("dimse.find", QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) == 4
    assert outcome_of("dimse.move", QueryRetrieveStatus.CANCEL) == 0
    assert outcome_of("dimse.commit", CommitmentStatus.NO_SUCH_ACTION_TYPE) == 4
    assert outcome_of("dimse.store", StoreStatus.OUT_OF_RESOURCES) == 8
