"""QIDO-RS (PS3.18 §10.6) at study level: query parameters -> StudyQuery -> DICOM JSON."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from imaging.dicom_model import index_document
from storage import (
    MAX_FUZZY_WORDS,
    DateRange,
    InstanceQuery,
    InstanceSummary,
    SeriesQuery,
    SeriesSummary,
    StudyQuery,
    StudySummary,
    TimeRange,
    fuzzy_name_words,
)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: Highest `offset`: far beyond any index, and within every database's integer range.
MAX_OFFSET = 1_000_000_000

#: The required matching keys of PS3.18 Table 10.6.1-5 at each level, by keyword (a
#: sequence item's attribute by its path). Any other attribute is ignored, with a Warning.
STUDY_MATCHING_KEYS = frozenset(
    {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "StudyID",
    }
)
#: Study-level attributes returned for every match (PS3.18 Table 10.6.3-3) plus counts.
STUDY_RETURN_KEYS = frozenset(
    STUDY_MATCHING_KEYS
    | {
        "PatientBirthDate",
        "PatientSex",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "SpecificCharacterSet",
        "RetrieveURL",
    }
)


class QueryParameterError(ValueError):
    """A QIDO-RS query parameter that cannot be honoured (400)."""


@dataclass(frozen=True)
class ParsedStudyQuery:
    """A parsed study search and the parameters that were ignored (for the Warning header)."""

    query: StudyQuery
    ignored: tuple[str, ...]
    fuzzy_requested: bool
    include: frozenset[str] = frozenset()


def _keyword(name: str) -> str | None:
    """A parameter name as a DICOM keyword: 'PatientID', '00100020' or '0010,0020'."""
    candidate = name.replace(",", "").strip()
    if len(candidate) == 8:
        try:
            return keyword_for_tag(int(candidate, 16)) or None
        except ValueError:
            pass
    return name if tag_for_keyword(name) is not None else None


def _sequence_path(name: str) -> str:
    """`ReferencedStudySequence.ReferencedSOPInstanceUID` or `00081110.00081155` as
    keywords; QueryParameterError unless every step but the last is a sequence."""
    parts = name.split(".")
    path = [_keyword(part) if part.strip() else None for part in parts]
    if any(k is None for k in path) or any(dictionary_VR(k) != "SQ" for k in path[:-1] if k):
        raise QueryParameterError(f"unknown query parameter {name!r}")
    return ".".join(k for k in path if k)


def _values(raw: str) -> tuple[str, ...]:
    """A list of UID or code values: comma- or backslash-separated (PS3.18 §8.3.4.1)."""
    return tuple(v.strip() for v in raw.replace("\\", ",").split(",") if v.strip())


def _parse_int(raw: str, name: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError as exc:  # also more digits than int() takes
        raise QueryParameterError(f"{name} must be an integer") from exc
    if value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise QueryParameterError(f"{name} must be at least {minimum}{bound}")
    return value


SERIES_MATCHING_KEYS = frozenset(
    {
        "Modality",
        "SeriesInstanceUID",
        "SeriesNumber",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "RequestAttributesSequence.RequestedProcedureID",
        "StudyInstanceUID",
    }
)
INSTANCE_MATCHING_KEYS = frozenset(
    {"SOPInstanceUID", "SOPClassUID", "InstanceNumber", "SeriesInstanceUID", "StudyInstanceUID"}
)


def _check_value(keyword: str, raw: str) -> None:
    """QueryParameterError unless `raw` is a matching value the key's VR allows (PS3.4
    C.2.2.2): no wildcard in a date, time, UID or number; ranges of dates and times."""
    vr = dictionary_VR(keyword.rsplit(".", 1)[-1])
    if vr == "DA":
        try:
            DateRange.parse(raw)
        except ValueError as exc:
            raise QueryParameterError(
                f"{keyword} must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-"
            ) from exc
    elif vr == "TM":
        try:
            TimeRange.parse(raw)
        except ValueError as exc:
            raise QueryParameterError(
                f"{keyword}: {exc}; a time is HH[MM[SS[.FFFFFF]]], "
                "a range time1-time2, -time or time-"
            ) from exc
    elif vr == "UI":
        for uid in _values(raw):
            if not uid.replace(".", "").isdigit():
                raise QueryParameterError(f"{keyword} must be UIDs")
    elif vr == "IS":
        _parse_int(raw, keyword, -(2**31), 2**31 - 1)


@dataclass(frozen=True)
class ParsedQuery:
    """Matching values by keyword, control values, and what was ignored."""

    values: dict[str, str]
    limit: int
    offset: int
    ignored: tuple[str, ...]
    fuzzy_requested: bool
    #: Tags (as 8-digit hex) asked for with `includefield`; "all" for every attribute.
    include: frozenset[str] = frozenset()


def parse_query(params: Iterable[tuple[str, str]], allowed: frozenset[str]) -> ParsedQuery:
    """Generic QIDO-RS parameter parsing for the series and instance levels."""
    values: dict[str, str] = {}
    ignored: list[str] = []
    limit, offset, fuzzy = DEFAULT_LIMIT, 0, False
    include: set[str] = set()
    for name, raw in params:
        if name == "limit":
            limit = _parse_int(raw, "limit", 1, MAX_LIMIT)
        elif name == "offset":
            offset = _parse_int(raw, "offset", 0, MAX_OFFSET)
        elif name == "fuzzymatching":
            fuzzy = raw.strip().lower() == "true"
        elif name == "includefield":
            for included in _values(raw):
                if included == "all":
                    include.add("all")
                    continue
                keyword = _keyword(included)
                if keyword is None:
                    raise QueryParameterError(f"includefield: unknown attribute {included!r}")
                include.add(f"{tag_for_keyword(keyword):08X}")
        else:
            # A sequence attribute path (PS3.18 §8.3.4.1) or an attribute.
            keyword = _sequence_path(name) if "." in name else _keyword(name)
            if keyword is None:
                raise QueryParameterError(f"unknown query parameter {name!r}")
            if keyword not in allowed:
                ignored.append(keyword)
            elif raw.strip() and raw.strip() != "*":  # empty or `*`: universal matching
                _check_value(keyword, raw.strip())
                values[keyword] = raw.strip()
    return ParsedQuery(values, limit, offset, tuple(ignored), fuzzy, frozenset(include))


def _date_range(value: str | None) -> DateRange | None:
    return DateRange.parse(value) if value else None  # checked by parse_query


def _time_range(value: str | None) -> TimeRange | None:
    return TimeRange.parse(value) if value else None  # checked by parse_query


def parse_study_query(params: Iterable[tuple[str, str]]) -> ParsedStudyQuery:
    """Turn QIDO-RS query parameters into a StudyQuery; QueryParameterError on bad values.
    StudyDate and StudyTime are matched apart, as PS3.4 C.2.2.2.5 says without the combined
    date-time extended negotiation (which QIDO-RS has no way to ask for)."""
    parsed = parse_query(params, STUDY_MATCHING_KEYS)
    values = parsed.values
    if parsed.fuzzy_requested and any(
        len(fuzzy_name_words(values.get(k, ""))) > MAX_FUZZY_WORDS
        for k in ("PatientName", "ReferringPhysicianName")
    ):
        raise QueryParameterError(
            f"fuzzy person name matching takes at most {MAX_FUZZY_WORDS} words"
        )
    query = StudyQuery(
        patient_id=values.get("PatientID"),
        patient_name=values.get("PatientName"),
        accession_number=values.get("AccessionNumber"),
        study_date=_date_range(values.get("StudyDate")),
        study_time=_time_range(values.get("StudyTime")),
        study_instance_uids=_values(values.get("StudyInstanceUID", "")),
        modalities=_values(values.get("ModalitiesInStudy", "")),
        study_id=values.get("StudyID"),
        referring_physician_name=values.get("ReferringPhysicianName"),
        limit=parsed.limit,
        offset=parsed.offset,
        fuzzy_person_names=parsed.fuzzy_requested,
    )
    # Fuzzy matching applies to the person names of the study level: supported, no warning.
    return ParsedStudyQuery(query, parsed.ignored, False, parsed.include)


def series_query(parsed: ParsedQuery, study: str | None) -> SeriesQuery:
    """The SeriesQuery of parsed series-level parameters, in `study` when given."""
    values = parsed.values
    number = values.get("SeriesNumber")
    return SeriesQuery(
        study_instance_uid=study,
        series_instance_uids=_values(values.get("SeriesInstanceUID", "")),
        modality=values.get("Modality"),
        series_number=int(number) if number else None,
        performed_procedure_step_start_date=_date_range(
            values.get("PerformedProcedureStepStartDate")
        ),
        performed_procedure_step_start_time=_time_range(
            values.get("PerformedProcedureStepStartTime")
        ),
        scheduled_procedure_step_id=values.get(
            "RequestAttributesSequence.ScheduledProcedureStepID"
        ),
        requested_procedure_id=values.get("RequestAttributesSequence.RequestedProcedureID"),
        limit=parsed.limit,
        offset=parsed.offset,
    )


def instance_query(parsed: ParsedQuery, study: str | None, series: str | None) -> InstanceQuery:
    """The InstanceQuery of parsed instance-level parameters, in `study`/`series` when given."""
    values = parsed.values
    number = values.get("InstanceNumber")
    return InstanceQuery(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uids=_values(values.get("SOPInstanceUID", "")),
        sop_class_uids=_values(values.get("SOPClassUID", "")),
        instance_number=int(number) if number else None,
        limit=parsed.limit,
        offset=parsed.offset,
    )


#: What `includefield=all` adds at each level, from a representative instance's JSON:
#: the Patient and General Study modules, then the General Series module.
STUDY_LEVEL_TAGS = frozenset(
    {
        "00080020",
        "00080030",
        "00080050",
        "00080090",
        "00081030",
        "00081032",
        "00081060",
        "00100010",
        "00100020",
        "00100030",
        "00100040",
        "00101010",
        "00101020",
        "00101030",
        "00200010",
        "0020000D",
        "00120062",
        "00120063",
        "00120064",
        "00280303",
    }
)
SERIES_LEVEL_TAGS = frozenset(
    {
        "00080021",
        "00080031",
        "00080060",
        "00080070",
        "0008103E",
        "00081090",
        "00180015",
        "00181030",
        "00185100",
        "0020000E",
        "00200011",
        "00200060",
        "00400244",
        "00400245",
    }
)


def include_fields(
    result: dict[str, object],
    source: dict[str, object] | None,
    include: frozenset[str],
    level_tags: frozenset[str] | None,
) -> dict[str, object]:
    """Add the attributes asked for with includefield, taken from `source` (DICOM JSON of a
    representative instance); `level_tags` bounds `all` (None: every attribute)."""
    if not include or source is None:
        return result
    wanted = set(include - {"all"})
    if "all" in include:
        wanted |= set(source) if level_tags is None else set(level_tags)
    for tag in sorted(wanted):
        if tag in result or tag not in source or tag == "7FE00010":
            continue
        value = source[tag]
        if isinstance(value, dict) and ("BulkDataURI" in value or "InlineBinary" in value):
            continue
        result[tag] = value
    return dict(sorted(result.items()))


def series_to_dicom_json(series: SeriesSummary, retrieve_base_url: str) -> dict[str, object]:
    return index_document(
        (
            ("Modality", series.modality),
            ("SeriesInstanceUID", series.series_instance_uid),
            ("SeriesNumber", series.series_number),
            ("SeriesDescription", series.series_description),
            ("BodyPartExamined", series.body_part_examined),
            ("NumberOfSeriesRelatedInstances", series.number_of_instances),
            ("PerformedProcedureStepStartDate", series.performed_procedure_step_start_date),
            ("PerformedProcedureStepStartTime", series.performed_procedure_step_start_time),
            ("StudyInstanceUID", series.study_instance_uid),
            (
                "RetrieveURL",
                (
                    f"{retrieve_base_url}/studies/{series.study_instance_uid}"
                    f"/series/{series.series_instance_uid}"
                ),
            ),
        )
    )


def instance_to_dicom_json(instance: InstanceSummary, retrieve_base_url: str) -> dict[str, object]:
    elements: list[tuple[str, object]] = [
        ("SOPClassUID", instance.sop_class_uid),
        ("SOPInstanceUID", instance.sop_instance_uid),
        ("AvailableTransferSyntaxUID", instance.transfer_syntax_uid),
        ("Modality", instance.modality),
        ("StudyInstanceUID", instance.study_instance_uid),
        ("SeriesInstanceUID", instance.series_instance_uid),
        ("InstanceNumber", instance.instance_number),
        (
            "RetrieveURL",
            (
                f"{retrieve_base_url}/studies/{instance.study_instance_uid}/series/"
                f"{instance.series_instance_uid}/instances/{instance.sop_instance_uid}"
            ),
        ),
    ]
    if instance.rows:
        elements += [("Rows", instance.rows), ("Columns", instance.columns)]
    if instance.number_of_frames:
        elements.append(("NumberOfFrames", instance.number_of_frames))
    return index_document(elements)


def study_to_dicom_json(study: StudySummary, retrieve_base_url: str) -> dict[str, object]:
    """One QIDO-RS study result as a DICOM JSON object (PS3.18 Annex F)."""
    elements: list[tuple[str, object]] = [
        ("StudyDate", study.study_date),
        ("StudyTime", study.study_time),
        ("AccessionNumber", study.accession_number),
        ("ModalitiesInStudy", tuple(study.modalities_in_study)),
        ("ReferringPhysicianName", study.referring_physician_name),
        ("PatientName", study.patient_name),
        ("PatientID", study.patient_id),
        ("PatientBirthDate", study.patient_birth_date),
        ("PatientSex", study.patient_sex),
        ("StudyInstanceUID", study.study_instance_uid),
        ("StudyID", study.study_id),
        ("StudyDescription", study.study_description),
        ("NumberOfStudyRelatedSeries", study.number_of_series),
        ("NumberOfStudyRelatedInstances", study.number_of_instances),
        ("RetrieveURL", f"{retrieve_base_url}/studies/{study.study_instance_uid}"),
    ]
    if study.specific_character_set:
        elements.append(("SpecificCharacterSet", tuple(study.specific_character_set.split("\\"))))
    return index_document(elements)


__all__ = [
    "MAX_LIMIT",
    "ParsedStudyQuery",
    "QueryParameterError",
    "instance_query",
    "parse_study_query",
    "series_query",
    "study_to_dicom_json",
]
