"""QIDO-RS (PS3.18 §10.6) at study level: query parameters -> StudyQuery -> DICOM JSON."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from storage import DateRange, InstanceSummary, SeriesSummary, StudyQuery, StudySummary

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

#: Study-level attributes this gateway matches on, by keyword.
STUDY_MATCHING_KEYS = frozenset(
    {"PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyInstanceUID",
     "ModalitiesInStudy"}
)
#: Study-level attributes returned for every match (PS3.18 Table 10.6.3-3) plus counts.
STUDY_RETURN_KEYS = frozenset(
    STUDY_MATCHING_KEYS
    | {"StudyTime", "ReferringPhysicianName", "StudyID", "PatientBirthDate", "PatientSex",
       "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
       "SpecificCharacterSet", "RetrieveURL"}
)


class QueryParameterError(ValueError):
    """A QIDO-RS query parameter that cannot be honoured (400)."""


@dataclass(frozen=True)
class ParsedStudyQuery:
    """A parsed study search and the parameters that were ignored (for the Warning header)."""

    query: StudyQuery
    ignored: tuple[str, ...]
    fuzzy_requested: bool


def _keyword(name: str) -> str | None:
    """A parameter name as a DICOM keyword: 'PatientID', '00100020' or '0010,0020'."""
    candidate = name.replace(",", "").strip()
    if len(candidate) == 8:
        try:
            return keyword_for_tag(int(candidate, 16)) or None
        except ValueError:
            pass
    return name if tag_for_keyword(name) is not None else None


def _values(raw: str) -> tuple[str, ...]:
    """A list of UID or code values: comma- or backslash-separated (PS3.18 §8.3.4.1)."""
    return tuple(v.strip() for v in raw.replace("\\", ",").split(",") if v.strip())


def _parse_int(raw: str, name: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise QueryParameterError(f"{name} must be an integer") from exc
    if value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise QueryParameterError(f"{name} must be at least {minimum}{bound}")
    return value


SERIES_MATCHING_KEYS = frozenset({"Modality", "SeriesInstanceUID", "SeriesNumber",
                                  "StudyInstanceUID"})
INSTANCE_MATCHING_KEYS = frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber",
                                    "SeriesInstanceUID", "StudyInstanceUID"})


@dataclass(frozen=True)
class ParsedQuery:
    """Matching values by keyword, control values, and what was ignored."""

    values: dict[str, str]
    limit: int
    offset: int
    ignored: tuple[str, ...]
    fuzzy_requested: bool


def parse_query(params: Iterable[tuple[str, str]], allowed: frozenset[str]) -> ParsedQuery:
    """Generic QIDO-RS parameter parsing for the series and instance levels."""
    values: dict[str, str] = {}
    ignored: list[str] = []
    limit, offset, fuzzy = DEFAULT_LIMIT, 0, False
    for name, raw in params:
        if name == "limit":
            limit = _parse_int(raw, "limit", 1, MAX_LIMIT)
        elif name == "offset":
            offset = _parse_int(raw, "offset", 0)
        elif name == "fuzzymatching":
            fuzzy = raw.strip().lower() == "true"
        elif name == "includefield":
            for included in _values(raw):
                if included != "all" and _keyword(included) is None:
                    raise QueryParameterError(f"includefield: unknown attribute {included!r}")
        else:
            keyword = _keyword(name)
            if keyword is None:
                raise QueryParameterError(f"unknown query parameter {name!r}")
            if keyword not in allowed:
                ignored.append(keyword)
            elif raw.strip() and raw.strip() != "*":
                if keyword in ("SeriesNumber", "InstanceNumber"):
                    _parse_int(raw, keyword, -(2**31), 2**31 - 1)
                elif keyword.endswith("UID"):
                    for uid in _values(raw):
                        if not uid.replace(".", "").isdigit():
                            raise QueryParameterError(f"{keyword} must be UIDs")
                values[keyword] = raw.strip()
    return ParsedQuery(values, limit, offset, tuple(ignored), fuzzy)


def parse_study_query(params: Iterable[tuple[str, str]]) -> ParsedStudyQuery:
    """Turn QIDO-RS query parameters into a StudyQuery; QueryParameterError on bad values."""
    parsed = parse_query(params, STUDY_MATCHING_KEYS)
    fields: dict[str, object] = {}
    for keyword, value in parsed.values.items():
        if keyword == "StudyDate":
            try:
                fields["study_date"] = DateRange.parse(value)
            except ValueError as exc:
                raise QueryParameterError(
                    "StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD") from exc
        elif keyword == "StudyInstanceUID":
            fields["study_instance_uids"] = _values(value)
        elif keyword == "ModalitiesInStudy":
            fields["modalities"] = _values(value)
        else:
            fields[_FIELD_OF[keyword]] = value
    query = StudyQuery(limit=parsed.limit, offset=parsed.offset, **fields)  # type: ignore[arg-type]
    return ParsedStudyQuery(query, parsed.ignored, parsed.fuzzy_requested)


_FIELD_OF = {"PatientID": "patient_id", "PatientName": "patient_name",
             "AccessionNumber": "accession_number"}


def series_to_dicom_json(series: SeriesSummary, retrieve_base_url: str) -> dict[str, object]:
    dataset = Dataset()
    dataset.Modality = series.modality
    dataset.SeriesInstanceUID = series.series_instance_uid
    dataset.SeriesNumber = series.series_number if series.series_number is not None else ""
    dataset.SeriesDescription = series.series_description
    dataset.BodyPartExamined = series.body_part_examined
    dataset.NumberOfSeriesRelatedInstances = series.number_of_instances
    dataset.StudyInstanceUID = series.study_instance_uid
    dataset.RetrieveURL = (f"{retrieve_base_url}/studies/{series.study_instance_uid}"
                           f"/series/{series.series_instance_uid}")
    return dataset.to_json_dict()


def instance_to_dicom_json(instance: InstanceSummary, retrieve_base_url: str) -> dict[str, object]:
    dataset = Dataset()
    dataset.SOPClassUID = instance.sop_class_uid
    dataset.SOPInstanceUID = instance.sop_instance_uid
    dataset.AvailableTransferSyntaxUID = instance.transfer_syntax_uid
    dataset.Modality = instance.modality
    dataset.StudyInstanceUID = instance.study_instance_uid
    dataset.SeriesInstanceUID = instance.series_instance_uid
    dataset.InstanceNumber = instance.instance_number if instance.instance_number is not None else ""
    if instance.rows:
        dataset.Rows, dataset.Columns = instance.rows, instance.columns
    if instance.number_of_frames:
        dataset.NumberOfFrames = instance.number_of_frames
    dataset.RetrieveURL = (f"{retrieve_base_url}/studies/{instance.study_instance_uid}/series/"
                           f"{instance.series_instance_uid}/instances/{instance.sop_instance_uid}")
    return dataset.to_json_dict()


def study_to_dicom_json(study: StudySummary, retrieve_base_url: str) -> dict[str, object]:
    """One QIDO-RS study result as a DICOM JSON object (PS3.18 Annex F)."""
    dataset = Dataset()
    if study.specific_character_set:
        dataset.SpecificCharacterSet = study.specific_character_set.split("\\")
    dataset.StudyDate = study.study_date
    dataset.StudyTime = study.study_time
    dataset.AccessionNumber = study.accession_number
    dataset.ModalitiesInStudy = list(study.modalities_in_study)
    dataset.ReferringPhysicianName = study.referring_physician_name
    dataset.PatientName = study.patient_name
    dataset.PatientID = study.patient_id
    dataset.PatientBirthDate = study.patient_birth_date
    dataset.PatientSex = study.patient_sex
    dataset.StudyInstanceUID = study.study_instance_uid
    dataset.StudyID = study.study_id
    dataset.StudyDescription = study.study_description
    dataset.NumberOfStudyRelatedSeries = study.number_of_series
    dataset.NumberOfStudyRelatedInstances = study.number_of_instances
    dataset.RetrieveURL = f"{retrieve_base_url}/studies/{study.study_instance_uid}"
    return dataset.to_json_dict()


__all__ = [
    "MAX_LIMIT",
    "ParsedStudyQuery",
    "QueryParameterError",
    "parse_study_query",
    "study_to_dicom_json",
]
