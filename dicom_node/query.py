"""Query/Retrieve SCP over the de-identified index (PS3.4 Annex C): C-FIND at PATIENT,
STUDY, SERIES and IMAGE level (Patient Root and Study Root), C-MOVE to configured
destination AEs and C-GET on the requestor's own association.

Handlers are generators, as pynetdicom expects: they yield Pending matches (or the
sub-operation count and datasets) and stop early when the peer cancels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from dicom_node.audit import NodeAudit
from dicom_node.policy import Caller, Right
from imaging import QueryRetrieveStatus, decompress_for_serving, read_bounded, text_of
from storage import (
    AccessScope,
    DateRange,
    InstanceQuery,
    InstanceSummary,
    ObjectNotFound,
    ObjectStore,
    QueryRetrieve,
    SeriesQuery,
    StorageError,
    StudyQuery,
    StudySummary,
    TimeRange,
)

log = logging.getLogger(__name__)

#: Most matches one C-FIND answers (a PACS asking for everything pages by date instead).
MAX_MATCHES = 5000
#: The sub-operation counts are US: a retrieve moves at most this many instances.
MAX_SUBOPERATIONS = 65535
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_Range = TypeVar("_Range", DateRange, TimeRange)


@dataclass(frozen=True)
class MoveDestination:
    ae_title: str
    host: str
    port: int


class QueryError(ValueError):
    """The identifier cannot be answered: (status, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _uids(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    text = text_of(identifier, keyword)
    return tuple(u.strip() for u in text.split("\\") if u.strip()) if text else ()


def _matching_value(identifier: Dataset, keyword: str) -> str | None:
    """A matching key's value, None for universal matching (empty or `*`)."""
    text = text_of(identifier, keyword)
    return None if text in ("", "*") else text


def _level(identifier: Dataset, model: str) -> str:
    level = text_of(identifier, "QueryRetrieveLevel").upper()
    if level not in LEVELS:
        raise QueryError(
            QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"QueryRetrieveLevel {level!r}: PATIENT, STUDY, SERIES or IMAGE",
        )
    if model == "STUDY" and level == "PATIENT":
        raise QueryError(
            QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            "the Study Root model has no PATIENT level",
        )
    return level


def _range(identifier: Dataset, keyword: str, parse: Callable[[str], _Range]) -> _Range | None:
    """A date or time matching key as a range (a single value is one), None if universal."""
    text = _matching_value(identifier, keyword)
    try:
        return parse(text) if text else None
    except ValueError as exc:
        raise QueryError(
            QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword}: {exc}"
        ) from exc


def _study_query(identifier: Dataset, limit: int) -> StudyQuery:
    """The study-level matching keys of an identifier (PS3.4 C.6.1.1.3, C.6.2.1.2). The
    combined date-time extended negotiation is not offered: StudyDate and StudyTime match
    apart (PS3.4 C.2.2.2.5)."""
    modalities = text_of(identifier, "ModalitiesInStudy")
    return StudyQuery(
        patient_id=_matching_value(identifier, "PatientID"),
        patient_name=_matching_value(identifier, "PatientName"),
        accession_number=_matching_value(identifier, "AccessionNumber"),
        study_date=_range(identifier, "StudyDate", DateRange.parse),
        study_time=_range(identifier, "StudyTime", TimeRange.parse),
        study_id=_matching_value(identifier, "StudyID"),
        referring_physician_name=_matching_value(identifier, "ReferringPhysicianName"),
        study_instance_uids=_uids(identifier, "StudyInstanceUID"),
        modalities=tuple(m for m in modalities.split("\\") if m and m != "*"),
        limit=limit,
    )


def _request_matching_value(identifier: Dataset, keyword: str) -> str | None:
    """A matching key inside RequestAttributesSequence (its one item, PS3.4 C.2.2.2.6)."""
    items = identifier.get("RequestAttributesSequence")
    return _matching_value(items[0], keyword) if items else None


def _series_query(identifier: Dataset, study_uid: str | None) -> SeriesQuery:
    return SeriesQuery(
        study_instance_uid=study_uid,
        series_instance_uids=_series_uids_filter(identifier),
        modality=_matching_value(identifier, "Modality"),
        series_number=_number(identifier, "SeriesNumber"),
        performed_procedure_step_start_date=_range(
            identifier, "PerformedProcedureStepStartDate", DateRange.parse
        ),
        performed_procedure_step_start_time=_range(
            identifier, "PerformedProcedureStepStartTime", TimeRange.parse
        ),
        scheduled_procedure_step_id=_request_matching_value(identifier, "ScheduledProcedureStepID"),
        requested_procedure_id=_request_matching_value(identifier, "RequestedProcedureID"),
        limit=MAX_MATCHES,
    )


def _studies(
    service: QueryRetrieve, identifier: Dataset, scope: AccessScope, limit: int = MAX_MATCHES
) -> list[StudySummary]:
    return service.search_for_studies(scope, _study_query(identifier, limit))


def _series_uids_filter(identifier: Dataset) -> tuple[str, ...]:
    return _uids(identifier, "SeriesInstanceUID")


def _number(identifier: Dataset, keyword: str) -> int | None:
    text = _matching_value(identifier, keyword)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise QueryError(
            QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword}: not a number"
        ) from exc


# Matching ------------------------------------------------------------------------------
def find_matches(
    service: QueryRetrieve, identifier: Dataset, model: str, ae_title: str, scope: AccessScope
) -> Iterator[tuple[frozenset[str], Dataset]]:
    """The response identifiers of a C-FIND request, one per match, each with the
    (de-identified) studies it is about, within `scope`."""
    level = _level(identifier, model)
    requested = [element.keyword for element in identifier if element.keyword]
    if level == "PATIENT":
        patients: dict[str, list[StudySummary]] = {}
        for study in _studies(service, identifier, scope):
            patients.setdefault(study.patient_id, []).append(study)
        for studies in patients.values():
            first = studies[0]
            values = {
                **_patient_values(first),
                "NumberOfPatientRelatedStudies": len(studies),
                "NumberOfPatientRelatedSeries": sum(s.number_of_series for s in studies),
                "NumberOfPatientRelatedInstances": sum(s.number_of_instances for s in studies),
            }
            yield (
                frozenset(s.study_instance_uid for s in studies),
                _response(requested, values, level, ae_title),
            )
        return
    if level == "STUDY":
        for study in _studies(service, identifier, scope):
            yield (
                frozenset({study.study_instance_uid}),
                _response(requested, _study_values(study), level, ae_title),
            )
        return
    filtered = _studies(service, identifier, scope) if _needs_study_filter(identifier) else None
    allowed = {s.study_instance_uid: s for s in filtered} if filtered is not None else None
    if level == "SERIES":
        for study_uid in _study_scope(identifier, allowed):
            for series in service.search_for_series(scope, _series_query(identifier, study_uid)):
                values = {
                    "StudyInstanceUID": series.study_instance_uid,
                    "SeriesInstanceUID": series.series_instance_uid,
                    "Modality": series.modality,
                    "SeriesNumber": series.series_number,
                    "SeriesDescription": series.series_description,
                    "BodyPartExamined": series.body_part_examined,
                    "PerformedProcedureStepStartDate": series.performed_procedure_step_start_date,
                    "PerformedProcedureStepStartTime": series.performed_procedure_step_start_time,
                    "NumberOfSeriesRelatedInstances": series.number_of_instances,
                }
                if allowed and series.study_instance_uid in allowed:
                    values = {**_study_values(allowed[series.study_instance_uid]), **values}
                yield (
                    frozenset({series.study_instance_uid}),
                    _response(requested, values, level, ae_title),
                )
        return
    series_uids = _series_uids_filter(identifier) or (None,)
    for study_uid in _study_scope(identifier, allowed):
        for series_uid in series_uids:
            for instance in service.search_for_instances(
                scope,
                InstanceQuery(
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_instance_uids=_uids(identifier, "SOPInstanceUID"),
                    sop_class_uids=_uids(identifier, "SOPClassUID"),
                    instance_number=_number(identifier, "InstanceNumber"),
                    limit=MAX_MATCHES,
                ),
            ):
                yield (
                    frozenset({instance.study_instance_uid}),
                    _response(requested, _instance_values(instance), level, ae_title),
                )


def _needs_study_filter(identifier: Dataset) -> bool:
    return any(
        _matching_value(identifier, k)
        for k in (
            "PatientID",
            "PatientName",
            "AccessionNumber",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "ReferringPhysicianName",
            "ModalitiesInStudy",
        )
    )


def _study_scope(
    identifier: Dataset, allowed: Mapping[str, StudySummary] | None
) -> list[str | None]:
    """The studies a SERIES/IMAGE query runs in: the UIDs given (hierarchical), narrowed by
    the study-level keys when there are any."""
    given = list(_uids(identifier, "StudyInstanceUID"))
    if allowed is not None:
        return [u for u in given if u in allowed] if given else list(allowed)
    return list(given) if given else [None]


def _patient_values(study: StudySummary) -> dict[str, Any]:
    return {
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "PatientBirthDate": study.patient_birth_date,
        "PatientSex": study.patient_sex,
    }


def _study_values(study: StudySummary) -> dict[str, Any]:
    return {
        **_patient_values(study),
        "StudyInstanceUID": study.study_instance_uid,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "StudyID": study.study_id,
        "StudyDescription": study.study_description,
        "ReferringPhysicianName": study.referring_physician_name,
        "ModalitiesInStudy": list(study.modalities_in_study),
        "NumberOfStudyRelatedSeries": study.number_of_series,
        "NumberOfStudyRelatedInstances": study.number_of_instances,
    }


def _instance_values(instance: InstanceSummary) -> dict[str, Any]:
    return {
        "StudyInstanceUID": instance.study_instance_uid,
        "SeriesInstanceUID": instance.series_instance_uid,
        "SOPInstanceUID": instance.sop_instance_uid,
        "SOPClassUID": instance.sop_class_uid,
        "InstanceNumber": instance.instance_number,
        "Rows": instance.rows,
        "Columns": instance.columns,
        "NumberOfFrames": instance.number_of_frames,
        "Modality": instance.modality,
        "AvailableTransferSyntaxUID": instance.transfer_syntax_uid,
    }


def _response(
    requested: list[str], values: Mapping[str, Any], level: str, ae_title: str
) -> Dataset:
    """Every requested key, filled when known, zero-length otherwise (PS3.4 C.4.1.1.3.2)."""
    response = Dataset()
    response.SpecificCharacterSet = "ISO_IR 192"
    for keyword in requested:
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        value = values.get(keyword)
        setattr(response, keyword, "" if value is None else value)
    response.QueryRetrieveLevel = level
    response.RetrieveAETitle = ae_title
    return response


# Retrieval -----------------------------------------------------------------------------
def retrieve_instances(
    service: QueryRetrieve, identifier: Dataset, model: str, scope: AccessScope
) -> list[InstanceSummary]:
    """The instances a C-MOVE/C-GET identifier names (unique keys at and above its level),
    within `scope`."""
    level = _level(identifier, model)
    if level == "PATIENT":
        patient = _matching_value(identifier, "PatientID")
        if not patient:
            raise QueryError(
                QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PatientID is required"
            )
        studies = [
            s.study_instance_uid
            for s in service.search_for_studies(
                scope, StudyQuery(patient_id=patient, limit=MAX_MATCHES)
            )
        ]
    else:
        studies = list(_uids(identifier, "StudyInstanceUID"))
        if not studies:
            raise QueryError(
                QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                "StudyInstanceUID is required",
            )
    series = _uids(identifier, "SeriesInstanceUID") if level in ("SERIES", "IMAGE") else ()
    if level in ("SERIES", "IMAGE") and not series:
        raise QueryError(
            QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "SeriesInstanceUID is required"
        )
    sops = _uids(identifier, "SOPInstanceUID") if level == "IMAGE" else ()
    if level == "IMAGE" and not sops:
        raise QueryError(
            QueryRetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID is required"
        )
    found: list[InstanceSummary] = []
    for series_uid in series or (None,):
        found += service.retrieve_instances(
            scope, studies, series_uid, sops, limit=MAX_SUBOPERATIONS + 1
        )
    return found


def _load(store: ObjectStore, instance: InstanceSummary, accepted: set[tuple[str, str]]) -> Dataset:
    """The stored instance, decompressed when the peer did not accept its stored syntax."""
    dataset = read_bounded(store.get(instance.object_key), check=False)  # bounded inflate
    syntax = str(dataset.file_meta.TransferSyntaxUID)
    if (instance.sop_class_uid, syntax) not in accepted and UID(syntax).is_compressed:
        decompress_for_serving(
            dataset
        )  # refuses an over-limit declaration, undecoded  # lossless: the same SOP Instance UID
    return dataset


def _send(
    store: ObjectStore,
    instances: list[InstanceSummary],
    accepted: Callable[[], set[tuple[str, str]]],
    cancelled: Callable[[], bool],
) -> Iterator[tuple[int, Dataset | None]]:
    for instance in instances:
        if cancelled():
            yield QueryRetrieveStatus.CANCEL, None
            return
        try:
            yield QueryRetrieveStatus.PENDING, _load(store, instance, accepted())
        except (ObjectNotFound, StorageError, OSError, ValueError, RuntimeError) as exc:
            log.error("retrieve: cannot read a stored instance (%s)", type(exc).__name__)
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = [instance.sop_instance_uid]
            yield QueryRetrieveStatus.UNABLE_TO_PROCESS, failed
            return


def _level_name(identifier: Dataset) -> str:
    """The request's level for the audit trail, only when it is one of the standard's."""
    level = text_of(identifier, "QueryRetrieveLevel").upper()
    return level if level in LEVELS else ""


class _AuditOnce:
    """Records an operation's audit event once, before its final response goes out (a
    generator's `finally` would run only when pynetdicom drops it, at garbage collection)."""

    def __init__(
        self,
        audit: NodeAudit,
        action: str,
        caller: Caller,
        detail: Callable[[], dict[str, Any]],
        studies: Callable[[], set[str]],
    ) -> None:
        self.audit, self.action, self.caller = audit, action, caller
        self.detail, self.studies = detail, studies
        self.recorded = False

    def __call__(self, status: int) -> int:
        if not self.recorded:
            self.recorded = True
            self.audit.record(
                self.action, self.caller, status, studies=self.studies(), detail=self.detail()
            )
        return status


def handle_find(
    event: Event,
    service: QueryRetrieve,
    model: str,
    ae_title: str,
    caller: Caller,
    audit: NodeAudit,
) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND within the caller's sites: one Pending per match; Failure for an identifier
    we cannot answer; 0x0124 for a caller without the find right. Audited."""
    studies: set[str] = set()
    matches = 0
    done = _AuditOnce(
        audit,
        "dimse.find",
        caller,
        lambda: {"model": model, "level": _level_name(event.identifier), "matches": matches},
        lambda: studies,
    )
    try:
        if not caller.may(Right.FIND):
            log.info("C-FIND refused: %s has no find right", caller.ae_title)
            yield done(QueryRetrieveStatus.NOT_AUTHORIZED), None
            return
        try:
            for study_uids, match in find_matches(
                service, event.identifier, model, ae_title, caller.scope
            ):
                if event.is_cancelled:
                    yield done(QueryRetrieveStatus.CANCEL), None
                    return
                matches += 1
                studies.update(study_uids)
                yield QueryRetrieveStatus.PENDING, match
        except QueryError as exc:
            log.info("C-FIND refused: %s", exc)
            yield done(exc.status), None
            return
        except (StorageError, OSError, ValueError, AttributeError) as exc:
            log.error("C-FIND failed: %s", type(exc).__name__)
            yield done(QueryRetrieveStatus.UNABLE_TO_PROCESS), None
            return
        yield done(QueryRetrieveStatus.SUCCESS), None
    finally:
        done(QueryRetrieveStatus.CANCEL)  # the association went away mid-answer


def _contexts(instances: list[InstanceSummary]) -> list[Any]:
    """For each SOP class: its stored syntaxes, and uncompressed as a fallback."""
    contexts = []
    by_class: dict[str, set[str]] = {}
    for instance in instances:
        by_class.setdefault(instance.sop_class_uid, set()).add(instance.transfer_syntax_uid)
    for sop_class, syntaxes in sorted(by_class.items()):
        for syntax in sorted(syntaxes - {ExplicitVRLittleEndian, ImplicitVRLittleEndian}):
            contexts.append(build_context(sop_class, [syntax]))
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts[:128]


def handle_move(
    event: Event,
    service: QueryRetrieve,
    store: ObjectStore,
    model: str,
    destinations: Mapping[str, MoveDestination],
    caller: Caller,
    audit: NodeAudit,
) -> Iterator[Any]:
    """C-MOVE within the caller's sites: resolve the destination AE, then send the
    instances on a new association proposing the stored syntax and uncompressed for each
    SOP class. A caller without the move right, or naming a destination it may not use,
    is answered 0xA801 like an unknown destination. Audited."""
    destination_ae = str(event.move_destination).strip()
    instances: list[InstanceSummary] = []
    notes: dict[str, Any] = {}
    done = _AuditOnce(
        audit,
        "dimse.move",
        caller,
        lambda: {
            "model": model,
            "level": _level_name(event.identifier),
            "destination_ae": destination_ae,
            "instances": len(instances),
            **notes,
        },
        lambda: {i.study_instance_uid for i in instances},
    )
    try:
        destination = destinations.get(destination_ae)
        if (
            destination is None
            or not caller.may(Right.MOVE)
            or not caller.may_move_to(destination_ae)
        ):
            notes["reason"] = "unknown destination" if destination is None else "not authorized"
            log.info("C-MOVE refused: %s (caller %s)", notes["reason"], caller.ae_title)
            done(QueryRetrieveStatus.MOVE_DESTINATION_UNKNOWN)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        try:
            instances = retrieve_instances(service, event.identifier, model, caller.scope)
        except QueryError as exc:
            notes["reason"] = f"identifier refused (0x{exc.status:04X})"
            instances = []
        if "reason" in notes or len(instances) > MAX_SUBOPERATIONS:
            notes.setdefault("reason", "too many instances")
            instances = []
            done(QueryRetrieveStatus.MOVE_UNABLE_TO_PROCESS)
            yield destination.host, destination.port
            yield None  # not a number: pynetdicom answers 0xC513 and sends nothing
            return
        accepted: set[tuple[str, str]] = set()
        reached: list[bool] = []

        def on_accepted(accept_event: Event) -> None:
            reached.append(True)
            accepted.update(
                (str(c.abstract_syntax), str(c.transfer_syntax[0]))
                for c in accept_event.assoc.accepted_contexts
            )

        if not instances:
            done(QueryRetrieveStatus.SUCCESS)  # pynetdicom answers Success, 0 sub-operations
        yield (
            destination.host,
            destination.port,
            {"contexts": _contexts(instances), "evt_handlers": [(evt.EVT_ACCEPTED, on_accepted)]},
        )
        yield len(instances)
        for result in _send(store, instances, lambda: accepted, lambda: bool(event.is_cancelled)):
            if result[0] != QueryRetrieveStatus.PENDING:
                done(result[0])
            yield result
        done(QueryRetrieveStatus.SUCCESS)  # asked for once the last sub-operation is done
    finally:
        if instances and not reached:  # pynetdicom could not associate: it answered 0xA801
            notes["reason"] = "destination unreachable"
            done(QueryRetrieveStatus.MOVE_DESTINATION_UNKNOWN)
        done(QueryRetrieveStatus.CANCEL)


def handle_get(
    event: Event,
    service: QueryRetrieve,
    store: ObjectStore,
    model: str,
    caller: Caller,
    audit: NodeAudit,
) -> Iterator[Any]:
    """C-GET within the caller's sites: the instances go back on the requestor's own
    association (role selection). Same rule as C-MOVE: the caller needs the get right
    (0x0124 otherwise) and retrieves only its sites' studies. Audited."""
    instances: list[InstanceSummary] = []
    done = _AuditOnce(
        audit,
        "dimse.get",
        caller,
        lambda: {
            "model": model,
            "level": _level_name(event.identifier),
            "instances": len(instances),
        },
        lambda: {i.study_instance_uid for i in instances},
    )
    try:
        if not caller.may(Right.GET):
            log.info("C-GET refused: %s has no get right", caller.ae_title)
            yield 1  # pynetdicom answers a failure only once sub-operations are announced
            yield done(QueryRetrieveStatus.NOT_AUTHORIZED), None
            return
        try:
            instances = retrieve_instances(service, event.identifier, model, caller.scope)
        except QueryError as exc:
            yield 1
            yield done(exc.status), None
            return
        if len(instances) > MAX_SUBOPERATIONS:
            instances = []
            yield 1
            yield done(QueryRetrieveStatus.OUT_OF_RESOURCES_SUBOPERATIONS), None
            return
        accepted = {
            (str(c.abstract_syntax), str(c.transfer_syntax[0]))
            for c in event.assoc.accepted_contexts
        }
        if not instances:
            done(QueryRetrieveStatus.SUCCESS)  # pynetdicom answers Success, 0 sub-operations
        yield len(instances)
        for result in _send(store, instances, lambda: accepted, lambda: bool(event.is_cancelled)):
            if result[0] != QueryRetrieveStatus.PENDING:
                done(result[0])
            yield result
        done(QueryRetrieveStatus.SUCCESS)
    finally:
        done(QueryRetrieveStatus.CANCEL)


__all__ = [
    "MoveDestination",
    "QueryError",
    "find_matches",
    "handle_find",
    "handle_get",
    "handle_move",
    "retrieve_instances",
]
