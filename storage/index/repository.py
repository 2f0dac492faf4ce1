"""The index repository: upsert what the worker stored, answer study-level queries."""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import (
    Engine,
    Select,
    String,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from imaging import text_of
from storage.index.models import Base, Instance, Patient, Series, Study, WithheldInstance


def _int(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _request_values(dataset: Dataset, keyword: str) -> str:
    """The values of `keyword` in the items of RequestAttributesSequence, backslash-joined
    (a series may fulfil several requests)."""
    found = [text_of(item, keyword, 16) for item in dataset.get("RequestAttributesSequence") or ()]
    return "\\".join(v for v in found if v)[:_REQUEST_VALUES_LENGTH]


#: Room for the request identifiers of a series (SH values, backslash-joined).
_REQUEST_VALUES_LENGTH = 256


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the index keeps of one stored (de-identified) instance."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        *,
        object_key: str,
        size_bytes: int,
        sha256: str,
        transfer_syntax_uid: str,
        site_id: str,
        source_transfer_syntax_uid: str = "",
        compression: str = "",
        study_site_id: str | None = None,
        local_patient_id: str = "",
    ) -> InstanceRecord:
        """Extract the indexed attributes of a de-identified dataset stored by `site_id`,
        in a study owned by `study_site_id` (default: the same site); `local_patient_id`:
        the pseudonym of the patient's local ID when PatientID is the INS's."""
        study_uid = text_of(dataset, "StudyInstanceUID", 64)
        series_uid = text_of(dataset, "SeriesInstanceUID", 64)
        return cls(
            patient={
                "patient_id": text_of(dataset, "PatientID", 64),
                "patient_name": text_of(dataset, "PatientName", 324),
                "patient_birth_date": text_of(dataset, "PatientBirthDate", 8),
                "patient_sex": text_of(dataset, "PatientSex", 16),
            },
            study={
                "study_instance_uid": study_uid,
                "patient_id": text_of(dataset, "PatientID", 64),
                "patient_name": text_of(dataset, "PatientName", 324),
                "patient_birth_date": text_of(dataset, "PatientBirthDate", 8),
                "patient_sex": text_of(dataset, "PatientSex", 16),
                "study_date": text_of(dataset, "StudyDate", 8),
                "study_time": text_of(dataset, "StudyTime", 16),
                "accession_number": text_of(dataset, "AccessionNumber", 16),
                "study_id": text_of(dataset, "StudyID", 16),
                "study_description": text_of(dataset, "StudyDescription", 64),
                "referring_physician_name": text_of(dataset, "ReferringPhysicianName", 324),
                "specific_character_set": text_of(dataset, "SpecificCharacterSet", 128),
                "site_id": (site_id if study_site_id is None else study_site_id)[:64],
                "local_patient_id": local_patient_id[:64],
            },
            series={
                "series_instance_uid": series_uid,
                "study_instance_uid": study_uid,
                "modality": text_of(dataset, "Modality", 16),
                "series_number": _int(dataset, "SeriesNumber"),
                "series_description": text_of(dataset, "SeriesDescription", 64),
                "body_part_examined": text_of(dataset, "BodyPartExamined", 16),
                "performed_procedure_step_start_date": text_of(
                    dataset, "PerformedProcedureStepStartDate", 8
                ),
                "performed_procedure_step_start_time": text_of(
                    dataset, "PerformedProcedureStepStartTime", 16
                ),
                "scheduled_procedure_step_ids": _request_values(
                    dataset, "ScheduledProcedureStepID"
                ),
                "requested_procedure_ids": _request_values(dataset, "RequestedProcedureID"),
            },
            instance={
                "sop_instance_uid": text_of(dataset, "SOPInstanceUID", 64),
                "series_instance_uid": series_uid,
                "study_instance_uid": study_uid,
                "sop_class_uid": text_of(dataset, "SOPClassUID", 64),
                "instance_number": _int(dataset, "InstanceNumber"),
                "transfer_syntax_uid": transfer_syntax_uid,
                "rows": _int(dataset, "Rows"),
                "columns": _int(dataset, "Columns"),
                "number_of_frames": _int(dataset, "NumberOfFrames"),
                "object_key": object_key,
                "size_bytes": size_bytes,
                "sha256": sha256,
                "source_transfer_syntax_uid": source_transfer_syntax_uid or transfer_syntax_uid,
                "compression": compression,
                "site_id": site_id[:64],
            },
        )


#: Study columns only its creation sets: its owner site and its patient.
_STUDY_OWNED = ("site_id", "patient_id", "patient_name", "patient_birth_date", "patient_sex")


def _study_column(column: Any) -> Any:
    return select(column).where(Study.study_instance_uid == bindparam("study")).scalar_subquery()


# What the index says of a study, a series and an instance, in one round trip (a writer
# checks it before storing each instance): built once, the compiled form is reused.
_OWNERSHIP = select(
    _study_column(Study.site_id),
    _study_column(Study.patient_id),
    select(Series.study_instance_uid)
    .where(Series.series_instance_uid == bindparam("series"))
    .scalar_subquery(),
    select(Instance.object_key)
    .where(Instance.sop_instance_uid == bindparam("sop"))
    .scalar_subquery(),
    _study_column(Study.accession_number),
    _study_column(Study.study_date),
)


@dataclass(frozen=True)
class DueStudy:
    """A study whose completion step is due, as read: its content (`instance_count`) and
    when it became pending (`due_at`, compared when marking it done)."""

    study_instance_uid: str
    instance_count: int
    due_at: dt.datetime | None
    attempts: int = 0


@dataclass(frozen=True)
class Ownership:
    """What the index holds of a study, a series and an instance (None: not indexed)."""

    study_site_id: str | None
    study_patient_id: str | None
    series_study_instance_uid: str | None
    instance_object_key: str | None
    #: The stored study's accession pseudonym and date (what a write-back takes on).
    study_accession_number: str = ""
    study_date: str = ""


@dataclass(frozen=True)
class DateRange:
    """An inclusive DICOM date range; an open end is None."""

    start: str | None
    end: str | None

    @classmethod
    def parse(cls, value: str) -> DateRange:
        """Parse 'YYYYMMDD', 'YYYYMMDD-', '-YYYYMMDD' or 'YYYYMMDD-YYYYMMDD' (ValueError if not)."""
        value = value.strip()
        if "-" in value:
            start, _, end = value.partition("-")
        else:
            start = end = value
        for part in (start, end):
            if part:
                dt.datetime.strptime(part, "%Y%m%d")  # raises ValueError on a bad date
        if not start and not end:
            raise ValueError("empty date range")
        return cls(start or None, end or None)


#: A TM value of a query (PS3.5 §6.2): HH, HHMM, HHMMSS or HHMMSS.F{1,6}.
_QUERY_TIME = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")


def _time_key(value: str, *, upper: bool) -> str:
    """A query time as the comparable key HHMMSS.FFFFFF: what a reduced precision leaves
    out is the start of the period it names for a lower bound, its end for an upper one
    ('1015' as an upper bound includes 10:15:59.999999). ValueError if not a TM."""
    found = _QUERY_TIME.fullmatch(value)
    if found is None:
        raise ValueError(f"{value!r} is not a time HH[MM[SS[.FFFFFF]]]")
    hours, minutes, seconds, fraction = found.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        raise ValueError(f"{value!r} is not a time of day")
    fill = ("59", "59", "9") if upper else ("00", "00", "0")
    return f"{hours}{minutes or fill[0]}{seconds or fill[1]}.{(fraction or '').ljust(6, fill[2])}"


@dataclass(frozen=True)
class TimeRange:
    """An inclusive range of times of day (PS3.4 C.2.2.2.5: within a day, never across
    midnight), as comparable keys HHMMSS.FFFFFF; an open end is None."""

    start: str | None
    end: str | None

    @classmethod
    def parse(cls, value: str) -> TimeRange:
        """Parse a single time (the period it names: '1015' is 10:15:00 to 10:15:59.999999),
        '<time>-', '-<time>' or '<time1>-<time2>' (ValueError if not, or if time1 is after
        time2)."""
        value = value.strip()
        start, _, end = value.partition("-") if "-" in value else (value, "", value)
        if not start and not end:
            raise ValueError("empty time range")
        found = cls(
            _time_key(start, upper=False) if start else None,
            _time_key(end, upper=True) if end else None,
        )
        if found.start and found.end and found.start > found.end:
            raise ValueError("a time range cannot cross midnight (PS3.4 C.2.2.2.5)")
        return found


def stored_time_key(column: Any) -> Any:
    """SQL for a stored TM column as the key HHMMSS.FFFFFF (padded with zeros, ACR-NEMA
    colons dropped) that `TimeRange` bounds compare with as strings."""
    digits = func.replace(column, ":", "", type_=String)
    whole = func.substr(digits.concat("000000"), 1, 6, type_=String)
    fraction = func.substr(
        func.substr(digits, 8, type_=String).concat("000000"), 1, 6, type_=String
    )
    return whole.concat(".").concat(fraction)


def _in_time_range(column: Any, start: Any, end: Any) -> list[Any]:
    """Conditions for a stored TM column within bounds (values or bind parameters; None for
    an open end): an empty value matches no range."""
    key = stored_time_key(column)
    return [
        column != "",
        *([key >= start] if start is not None else []),
        *([key <= end] if end is not None else []),
    ]


def _in_date_range(column: Any, start: Any, end: Any) -> list[Any]:
    """Conditions for a stored DA column within bounds (values or bind parameters; None for
    an open end): an empty value matches no range."""
    return [
        column != "",
        *([column >= start] if start is not None else []),
        *([column <= end] if end is not None else []),
    ]


def _multi_valued_matching(column: Any, pattern: str) -> Any:
    """Single value or wildcard matching of one of the backslash-joined values of a column."""
    like, value = _wildcard_value(pattern)
    if not like:  # an exact value, as one of the joined values
        value = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return or_(
        *(
            column.like(f"{before}{value}{after}", escape="\\")
            for before in ("", "%\\\\")
            for after in ("", "\\\\%")
        )
    )


@dataclass(frozen=True)
class AccessScope:
    """What a caller may see: some sites' studies, a share's studies, some series of them.
    Every query applies it in SQL, so limit/offset and counts stay right."""

    #: None: every site's studies.
    site_ids: frozenset[str] | None = None
    #: None: every study (of those sites).
    study_instance_uids: frozenset[str] | None = None
    #: Studies shared only in part -> the series of each that are shared.
    series_limits: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def allows(self, study_instance_uid: str, series_instance_uid: str | None = None) -> bool:
        """The study/series is inside the scope (the site is checked by the queries)."""
        if (
            self.study_instance_uids is not None
            and study_instance_uid not in self.study_instance_uids
        ):
            return False
        limits = self.series_limits.get(study_instance_uid)
        return series_instance_uid is None or limits is None or series_instance_uid in limits

    @property
    def shape(self) -> tuple[bool, bool, bool]:
        """Which restrictions apply (site, studies, series of some studies): the form of
        the SQL, whose values are `parameters()`."""
        return (
            self.site_ids is not None,
            self.study_instance_uids is not None,
            bool(self.series_limits),
        )

    def parameters(self) -> dict[str, Any]:
        return {
            "scope_sites": sorted(self.site_ids or ()),
            "scope_studies": sorted(self.study_instance_uids or ()),
            "scope_limited_studies": sorted(self.series_limits),
            "scope_limited_series": sorted(set().union(*self.series_limits.values())),
        }

    def conditions(self, study_column: Any, series_column: Any | None = None) -> list[Any]:
        """The scope as SQL conditions with its values bound."""
        return scope_conditions(self.shape, study_column, series_column, self.parameters())


def scope_conditions(
    shape: tuple[bool, bool, bool],
    study_column: Any,
    series_column: Any | None = None,
    values: Mapping[str, Any] | None = None,
) -> list[Any]:
    """An AccessScope of this `shape` as SQL conditions; without `values`, the statement
    takes them as parameters at execution (so it can be built once and reused)."""

    def bind(name: str, expanding: bool = False) -> Any:
        if values is None:
            return bindparam(name, expanding=expanding)
        return bindparam(name, values[name], expanding=expanding)

    has_site, has_studies, has_limits = shape
    found: list[Any] = []
    if has_site:
        found.append(
            study_column.in_(
                select(Study.study_instance_uid).where(
                    Study.site_id.in_(bind("scope_sites", expanding=True))
                )
            )
        )
    if has_studies:
        found.append(study_column.in_(bind("scope_studies", expanding=True)))
    if series_column is not None and has_limits:
        found.append(
            or_(
                study_column.not_in(bind("scope_limited_studies", expanding=True)),
                series_column.in_(bind("scope_limited_series", expanding=True)),
            )
        )
    return found


@dataclass(frozen=True)
class StudyQuery:
    """Study-level matching keys (PS3.4 C.2.2.2): single value, wildcard, list, range."""

    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: DateRange | None = None
    study_instance_uids: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    #: Range (or single value) of StudyTime, matched within a day, apart from StudyDate
    #: (PS3.4 C.2.2.2.5 without the combined date-time extended negotiation).
    study_time: TimeRange | None = None
    study_id: str | None = None
    referring_physician_name: str | None = None
    limit: int = 100
    offset: int = 0
    scope: AccessScope | None = None
    #: Fuzzy matching of the person names, PatientName and ReferringPhysicianName (QIDO
    #: `fuzzymatching=true`): each word of the query begins some component of the name,
    #: in any order, whatever the case.
    fuzzy_person_names: bool = False


@dataclass(frozen=True)
class StudySummary:
    """A study row with its aggregates, as QIDO-RS returns it."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    specific_character_set: str
    modalities_in_study: tuple[str, ...] = field(default_factory=tuple)
    number_of_series: int = 0
    number_of_instances: int = 0


@dataclass(frozen=True)
class SeriesQuery:
    """Series-level matching keys (PS3.18 Table 10.6.1-5): single value, wildcard (not for
    dates, times and UIDs), list of UIDs, date and time ranges."""

    study_instance_uid: str | None = None
    series_instance_uids: tuple[str, ...] = ()
    modality: str | None = None
    series_number: int | None = None
    performed_procedure_step_start_date: DateRange | None = None
    performed_procedure_step_start_time: TimeRange | None = None
    #: Matched against every item of RequestAttributesSequence.
    scheduled_procedure_step_id: str | None = None
    requested_procedure_id: str | None = None
    limit: int = 100
    offset: int = 0
    scope: AccessScope | None = None


@dataclass(frozen=True)
class SeriesSummary:
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    number_of_instances: int
    performed_procedure_step_start_date: str = ""
    performed_procedure_step_start_time: str = ""


@dataclass(frozen=True)
class InstanceQuery:
    """Instance-level matching keys: UID lists, InstanceNumber single value."""

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    sop_class_uids: tuple[str, ...] = ()
    instance_number: int | None = None
    limit: int = 100
    offset: int = 0
    scope: AccessScope | None = None


@dataclass(frozen=True)
class InstanceSummary:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    transfer_syntax_uid: str
    object_key: str
    size_bytes: int
    sha256: str
    modality: str
    updated_at: dt.datetime | None


def _wildcard_value(pattern: str, *, case_insensitive: bool = False) -> tuple[bool, str]:
    """PS3.4 wildcard matching: '*' any run, '?' one character. (is a LIKE pattern, the
    value to compare with), SQL specials escaped in patterns."""
    if "*" not in pattern and "?" not in pattern:
        return False, pattern.upper() if case_insensitive else pattern
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = escaped.replace("*", "%").replace("?", "_")
    return True, like.upper() if case_insensitive else like


def _matching(column: Any, like: bool, value: Any, *, case_insensitive: bool = False) -> Any:
    """The condition for a value (or bind parameter) from `_wildcard_value`."""
    target = func.upper(column) if case_insensitive else column
    return target.like(value, escape="\\") if like else target == value


def _wildcard(column: Any, pattern: str, *, case_insensitive: bool = False) -> Any:
    like, value = _wildcard_value(pattern, case_insensitive=case_insensitive)
    return _matching(column, like, value, case_insensitive=case_insensitive)


#: The form of a study search: per text key None / exact / LIKE, which date and time
#: bounds, UID list, modalities, how many words each fuzzy person name has, the caller's
#: scope shape.
_StudyShape = tuple[
    tuple[bool | None, ...],
    tuple[bool, bool, bool],
    tuple[bool, bool, bool],
    bool,
    bool,
    tuple[int, int],
    tuple[bool, bool, bool],
]

#: The text keys of a study search: (field, column, case-insensitive: the PN ones).
_STUDY_TEXT_KEYS = (
    ("patient_id", Study.patient_id, False),
    ("patient_name", Study.patient_name, True),
    ("accession_number", Study.accession_number, False),
    ("study_id", Study.study_id, False),
    ("referring_physician_name", Study.referring_physician_name, True),
)
#: The person names fuzzy matching applies to, with the prefix of their words' parameters.
_FUZZY_NAMES = (
    ("patient_name", Study.patient_name, "name_word"),
    ("referring_physician_name", Study.referring_physician_name, "referring_word"),
)

#: What separates the words of a person name (components, groups, spaces).
_NAME_SEPARATORS = re.compile(r"[\s^=,]+")


#: Words of a fuzzy PatientName that are matched: each is a condition of the statement, and
#: each count a form of it (compiled and cached); a person's name has fewer.
MAX_FUZZY_WORDS = 8


def fuzzy_name_words(pattern: str) -> list[str]:
    """The words of a fuzzy PatientName query, upper case, as LIKE-escaped prefixes (a
    search matches the first MAX_FUZZY_WORDS)."""
    words = [w for w in _NAME_SEPARATORS.split(pattern.upper()) if w.strip("*?")]
    return [_wildcard_value(w.rstrip("*") + "*")[1] for w in words]


def _study_plan(query: StudyQuery) -> tuple[_StudyShape, dict[str, Any]]:
    """The form of `query`'s SQL and the values it takes."""
    values: dict[str, Any] = {"limit": query.limit, "offset": query.offset}
    fuzzy_counts: list[int] = []
    fuzzy_fields: set[str] = set()
    for name, _column, prefix in _FUZZY_NAMES:
        pattern = getattr(query, name)
        words = (
            fuzzy_name_words(pattern)[:MAX_FUZZY_WORDS]
            if query.fuzzy_person_names and pattern
            else []
        )
        for number, word in enumerate(words):
            values[f"{prefix}_{number}"] = word
        if words:
            fuzzy_fields.add(name)
        fuzzy_counts.append(len(words))
    kinds: list[bool | None] = []
    for name, _column, insensitive in _STUDY_TEXT_KEYS:
        pattern = None if name in fuzzy_fields else getattr(query, name)
        if not pattern:
            kinds.append(None)
            continue
        like, values[name] = _wildcard_value(pattern, case_insensitive=insensitive)
        kinds.append(like)
    dates, times = query.study_date, query.study_time
    values.update(
        date_start=dates.start if dates else None,
        date_end=dates.end if dates else None,
        time_start=times.start if times else None,
        time_end=times.end if times else None,
        uids=list(query.study_instance_uids),
        modalities=list(query.modalities),
    )
    scope = query.scope or AccessScope()
    values.update(scope.parameters())
    shape: _StudyShape = (
        tuple(kinds),
        (dates is not None, bool(dates and dates.start), bool(dates and dates.end)),
        (times is not None, bool(times and times.start), bool(times and times.end)),
        bool(query.study_instance_uids),
        bool(query.modalities),
        (fuzzy_counts[0], fuzzy_counts[1]),
        scope.shape,
    )
    return shape, values


def _fuzzy_name_conditions(column: Any, prefix: str, words: int) -> list[Any]:
    """Each word begins the name, a component or a space-separated part."""
    person = func.upper(column)
    return [
        or_(
            *(
                person.like(start + bindparam(f"{prefix}_{number}"), escape="\\")
                for start in ("", "%^", "% ", "%=")
            )
        )
        for number in range(words)
    ]


def _study_conditions(shape: _StudyShape) -> list[Any]:
    kinds, (dated, start, end), (timed, after, before), uids, modalities, fuzzy, scope = shape
    conditions: list[Any] = []
    for (_name, column, prefix), words in zip(_FUZZY_NAMES, fuzzy, strict=True):
        conditions += _fuzzy_name_conditions(column, prefix, words)
    for like, (name, column, insensitive) in zip(kinds, _STUDY_TEXT_KEYS, strict=True):
        if like is not None:
            conditions.append(
                _matching(column, like, bindparam(name), case_insensitive=insensitive)
            )
    if dated:
        conditions += _in_date_range(
            Study.study_date,
            bindparam("date_start") if start else None,
            bindparam("date_end") if end else None,
        )
    if timed:
        conditions += _in_time_range(
            Study.study_time,
            bindparam("time_start") if after else None,
            bindparam("time_end") if before else None,
        )
    if uids:
        conditions.append(Study.study_instance_uid.in_(bindparam("uids", expanding=True)))
    if modalities:
        conditions.append(
            exists().where(
                Series.study_instance_uid == Study.study_instance_uid,
                Series.modality.in_(bindparam("modalities", expanding=True)),
            )
        )
    return conditions + scope_conditions(scope, Study.study_instance_uid)


@functools.lru_cache(maxsize=512)
def _study_search_statement(shape: _StudyShape) -> Select[Any]:
    """Built once per form: building a statement costs more than running it."""
    # A share of some series of a study counts (and lists modalities of) those only.
    limited = (False, False, shape[-1][2])
    series_limit = scope_conditions(limited, Series.study_instance_uid, Series.series_instance_uid)
    instance_limit = scope_conditions(
        limited, Instance.study_instance_uid, Instance.series_instance_uid
    )
    series_count = (
        select(func.count())
        .where(Series.study_instance_uid == Study.study_instance_uid, *series_limit)
        .correlate(Study)
        .scalar_subquery()
    )
    instance_count = (
        select(func.count())
        .where(Instance.study_instance_uid == Study.study_instance_uid, *instance_limit)
        .correlate(Study)
        .scalar_subquery()
    )
    modalities = (
        select(func.aggregate_strings(Series.modality, "\\"))
        .where(Series.study_instance_uid == Study.study_instance_uid, *series_limit)
        .correlate(Study)
        .scalar_subquery()
    )
    return (
        select(Study.__table__)
        .where(*_study_conditions(shape))
        .add_columns(
            series_count.label("n_series"),
            instance_count.label("n_instances"),
            modalities.label("modalities"),
        )
        .order_by(Study.study_date.desc(), Study.study_time.desc(), Study.study_instance_uid)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )


def study_search(query: StudyQuery) -> tuple[Select[Any], dict[str, Any]]:
    """The statement of a study search and the values it binds. Queries of one form (the
    keys they match on, not the values) share one statement object, built once."""
    shape, values = _study_plan(query)
    return _study_search_statement(shape), values


def study_summaries(rows: Iterable[Any]) -> list[StudySummary]:
    """The rows of a `study_search` statement (attributes named as its columns) as studies."""
    return [
        StudySummary(
            study_instance_uid=s.study_instance_uid,
            patient_id=s.patient_id,
            patient_name=s.patient_name,
            patient_birth_date=s.patient_birth_date,
            patient_sex=s.patient_sex,
            study_date=s.study_date,
            study_time=s.study_time,
            accession_number=s.accession_number,
            study_id=s.study_id,
            study_description=s.study_description,
            referring_physician_name=s.referring_physician_name,
            specific_character_set=s.specific_character_set,
            number_of_series=int(s.n_series or 0),
            number_of_instances=int(s.n_instances or 0),
            modalities_in_study=tuple(sorted({m for m in (s.modalities or "").split("\\") if m})),
        )
        for s in rows
    ]


#: Why a site withheld an instance, as its recipients are told (never a value of it).
WITHHELD_REASONS = ("pixels_may_identify", "too_large", "not_deidentifiable")


@dataclass(frozen=True)
class WithheldRecord:
    """An instance kept in quarantine at its site, by its de-identified UIDs."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    reason: str
    site_id: str


@dataclass(frozen=True)
class WithheldSummary:
    """How many instances of a study (of one modality) were withheld, and why."""

    study_instance_uid: str
    modality: str
    reason: str
    count: int


class IndexRepository:
    """Index reads and writes; one short transaction per call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _insert(self, model: Any) -> Any:
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            return postgresql.insert(model)
        if dialect == "sqlite":
            return sqlite.insert(model)
        raise NotImplementedError(f"index dialect {dialect!r} is not supported")

    def _upsert(
        self,
        session: Session,
        model: Any,
        values: dict[str, Any],
        key: str,
        *,
        keep: Sequence[str] = (),
        fill: Sequence[str] = (),
        where: Any = None,
    ) -> None:
        """Insert, or update every column but `key` and `keep` (and `fill`, set only while
        empty: the first value stays, whatever order the rows come in), where `where`
        holds."""
        statement = self._insert(model).values(**values)
        updates: dict[str, Any] = {
            name: statement.excluded[name]
            for name in values
            if name != key and name not in keep and name not in fill
        }
        for name in fill:
            column = getattr(model, name)
            updates[name] = case((column == "", statement.excluded[name]), else_=column)
        updates["updated_at"] = func.now()
        session.execute(
            statement.on_conflict_do_update(index_elements=[key], set_=updates, where=where)
        )

    def _insert_absent(self, session: Session, model: Any, values: dict[str, Any]) -> None:
        session.execute(self._insert(model).values(**values).on_conflict_do_nothing())

    def upsert_instance(self, record: InstanceRecord) -> None:
        """Insert or update the study, series and instance rows (idempotent)."""
        self.upsert_instances([record])

    def upsert_instances(self, records: Sequence[InstanceRecord]) -> None:
        """Upsert several instances in one transaction (idempotent). What a later writer
        cannot change (the trust model): a patient row once written; a study's owner and
        patient, and its other attributes unless the writer is its owner; the study of a
        series, and its attributes unless the writer owns the study; the object and owner of
        an instance (a row naming another object is left
        as it is)."""
        # One statement per distinct parent row (a batch is mostly one study and series).
        patients = {r.patient["patient_id"]: r.patient for r in records}
        studies = {r.study["study_instance_uid"]: r.study for r in records}
        owned = {
            r.study["study_instance_uid"]
            for r in records
            if r.instance["site_id"] == r.study["site_id"]
        }
        series = {r.series["series_instance_uid"]: r.series for r in records}
        with Session(self.engine) as session, session.begin():
            for values in patients.values():
                self._insert_absent(session, Patient, values)
            for uid, values in studies.items():
                if uid in owned:
                    self._upsert(
                        session,
                        Study,
                        values,
                        "study_instance_uid",
                        keep=_STUDY_OWNED,
                        fill=("local_patient_id",),
                    )
                else:
                    self._insert_absent(session, Study, values)
            for values in series.values():
                if values["study_instance_uid"] in owned:
                    self._upsert(
                        session,
                        Series,
                        values,
                        "series_instance_uid",
                        where=Series.study_instance_uid == values["study_instance_uid"],
                    )
                else:  # another site's series keep their attributes
                    self._insert_absent(session, Series, values)
            if records:  # one statement for the batch's instances, executed for each row
                statement = self._insert(Instance)
                updates: dict[str, Any] = {
                    name: statement.excluded[name]
                    for name in records[0].instance
                    if name not in ("sop_instance_uid", "site_id")
                }
                updates["updated_at"] = func.now()
                session.connection().execute(
                    statement.on_conflict_do_update(
                        index_elements=["sop_instance_uid"],
                        set_=updates,
                        where=Instance.object_key == statement.excluded.object_key,
                    ),
                    [record.instance for record in records],
                )
                # Their studies' completion is pending, in the same transaction: a crash
                # after the instances are searchable cannot lose it.
                session.execute(
                    update(Study)
                    .where(Study.study_instance_uid.in_(list(studies)))
                    .values(completion_due_at=dt.datetime.now(dt.UTC))
                )

    def record_withheld(self, record: WithheldRecord) -> None:
        """Say that an instance of a study was withheld at its site (idempotent: a retried
        batch records it once, with its latest reason)."""
        if record.reason not in WITHHELD_REASONS:
            raise ValueError(f"unknown withheld reason {record.reason!r}")
        values = {
            "sop_instance_uid": record.sop_instance_uid,
            "study_instance_uid": record.study_instance_uid,
            "series_instance_uid": record.series_instance_uid,
            "modality": record.modality[:16],
            "reason": record.reason,
            "site_id": record.site_id,
            "withheld_at": dt.datetime.now(dt.UTC),
        }
        statement = self._insert(WithheldInstance).values(**values)
        with Session(self.engine) as session, session.begin():
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["sop_instance_uid"],
                    set_={k: statement.excluded[k] for k in ("reason", "modality", "withheld_at")},
                    # another study's instance under this UID: not ours to describe
                    where=WithheldInstance.study_instance_uid == record.study_instance_uid,
                )
            )

    def withheld(self, scope: AccessScope | None = None) -> list[WithheldSummary]:
        """The withheld instances of the indexed studies in `scope`, counted by study,
        modality and reason; an instance stored since (sent again once its site could
        clean it) no longer counts."""
        stored = select(Instance.sop_instance_uid).where(
            Instance.sop_instance_uid == WithheldInstance.sop_instance_uid
        )
        conditions: list[Any] = [~stored.exists()]
        if scope is not None:
            conditions += scope.conditions(
                WithheldInstance.study_instance_uid, WithheldInstance.series_instance_uid
            )
        statement = (
            select(
                WithheldInstance.study_instance_uid,
                WithheldInstance.modality,
                WithheldInstance.reason,
                func.count(),
            )
            .join(Study, Study.study_instance_uid == WithheldInstance.study_instance_uid)
            .where(*conditions)
            .group_by(
                WithheldInstance.study_instance_uid,
                WithheldInstance.modality,
                WithheldInstance.reason,
            )
            .order_by(
                WithheldInstance.study_instance_uid,
                WithheldInstance.modality,
                WithheldInstance.reason,
            )
        )
        with self.engine.connect() as connection:
            return [
                WithheldSummary(str(study), str(modality), str(reason), int(count))
                for study, modality, reason, count in connection.execute(statement)
            ]

    def ownership(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> Ownership:
        """What the index already says of a study, a series and an instance (a writer
        checks it before storing: see the trust model)."""
        with self.engine.connect() as connection:
            (site, patient, series_study, instance_key, accession, study_date) = connection.execute(
                _OWNERSHIP,
                {
                    "study": study_instance_uid,
                    "series": series_instance_uid,
                    "sop": sop_instance_uid,
                },
            ).one()
        return Ownership(
            study_site_id=site,
            study_patient_id=patient,
            series_study_instance_uid=series_study,
            instance_object_key=instance_key,
            study_accession_number=accession or "",
            study_date=study_date or "",
        )

    def studies_of_local_patient(self, local_patient_id: str, limit: int = 1000) -> list[str]:
        """The UIDs of the studies whose patient, known by the INS, has this local-ID
        pseudonym (see `Study.local_patient_id`)."""
        if not local_patient_id:
            return []
        with self.engine.connect() as connection:
            return list(
                connection.scalars(
                    select(Study.study_instance_uid)
                    .where(Study.local_patient_id == local_patient_id)
                    .order_by(Study.study_instance_uid)
                    .limit(limit)
                )
            )

    def study_site_ids(self) -> list[str]:
        """The sites that own the indexed studies."""
        with self.engine.connect() as connection:
            return list(
                connection.scalars(
                    select(Study.site_id)
                    .where(Study.site_id != "")
                    .distinct()
                    .order_by(Study.site_id)
                )
            )

    def search_studies(self, query: StudyQuery) -> list[StudySummary]:
        """Matching studies, newest first, with their series/instance counts and modalities."""
        # One statement with correlated counts, on a plain connection, built once per form
        # of query: three round trips and the ORM's identity map cost more than the query.
        statement, values = study_search(query)
        with self.engine.connect() as connection:
            return study_summaries(connection.execute(statement, values))

    def count_studies(self, query: StudyQuery) -> int:
        """How many studies match, ignoring limit and offset."""
        shape, values = _study_plan(query)
        statement = select(func.count()).select_from(
            select(Study.study_instance_uid).where(*_study_conditions(shape)).subquery()
        )
        with self.engine.connect() as connection:
            return int(connection.scalar(statement, values) or 0)

    def search_series(self, query: SeriesQuery) -> list[SeriesSummary]:
        """Matching series with their instance counts, by study then series number."""
        conditions: list[Any] = []
        if query.study_instance_uid:
            conditions.append(Series.study_instance_uid == query.study_instance_uid)
        if query.series_instance_uids:
            conditions.append(Series.series_instance_uid.in_(query.series_instance_uids))
        if query.modality:
            conditions.append(_wildcard(Series.modality, query.modality))
        if query.series_number is not None:
            conditions.append(Series.series_number == query.series_number)
        dates = query.performed_procedure_step_start_date
        if dates is not None:
            conditions += _in_date_range(
                Series.performed_procedure_step_start_date, dates.start, dates.end
            )
        times = query.performed_procedure_step_start_time
        if times is not None:
            conditions += _in_time_range(
                Series.performed_procedure_step_start_time, times.start, times.end
            )
        if query.scheduled_procedure_step_id:
            conditions.append(
                _multi_valued_matching(
                    Series.scheduled_procedure_step_ids, query.scheduled_procedure_step_id
                )
            )
        if query.requested_procedure_id:
            conditions.append(
                _multi_valued_matching(Series.requested_procedure_ids, query.requested_procedure_id)
            )
        if query.scope is not None:
            conditions += query.scope.conditions(
                Series.study_instance_uid, Series.series_instance_uid
            )
        counts = (
            select(Instance.series_instance_uid.label("uid"), func.count().label("n"))
            .group_by(Instance.series_instance_uid)
            .subquery()
        )
        statement = (
            select(Series, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.uid == Series.series_instance_uid)
            .where(*conditions)
            .order_by(Series.study_instance_uid, Series.series_number, Series.series_instance_uid)
            .limit(query.limit)
            .offset(query.offset)
        )
        with Session(self.engine) as session:
            return [
                SeriesSummary(
                    s.study_instance_uid,
                    s.series_instance_uid,
                    s.modality,
                    s.series_number,
                    s.series_description,
                    s.body_part_examined,
                    int(n),
                    s.performed_procedure_step_start_date,
                    s.performed_procedure_step_start_time,
                )
                for s, n in session.execute(statement)
            ]

    def search_instances(self, query: InstanceQuery) -> list[InstanceSummary]:
        """Matching instances, in series then instance-number order."""
        conditions: list[Any] = []
        if query.study_instance_uid:
            conditions.append(Instance.study_instance_uid == query.study_instance_uid)
        if query.series_instance_uid:
            conditions.append(Instance.series_instance_uid == query.series_instance_uid)
        if query.sop_instance_uids:
            conditions.append(Instance.sop_instance_uid.in_(query.sop_instance_uids))
        if query.sop_class_uids:
            conditions.append(Instance.sop_class_uid.in_(query.sop_class_uids))
        if query.instance_number is not None:
            conditions.append(Instance.instance_number == query.instance_number)
        if query.scope is not None:
            conditions += query.scope.conditions(
                Instance.study_instance_uid, Instance.series_instance_uid
            )
        columns = Instance.__table__.c
        statement = (
            select(
                columns.study_instance_uid,
                columns.series_instance_uid,
                columns.sop_instance_uid,
                columns.sop_class_uid,
                columns.instance_number,
                columns.rows,
                columns.columns,
                columns.number_of_frames,
                columns.transfer_syntax_uid,
                columns.object_key,
                columns.size_bytes,
                columns.sha256,
                func.coalesce(Series.modality, "").label("modality"),
                columns.updated_at,
            )
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(*conditions)
            .order_by(
                Instance.series_instance_uid, Instance.instance_number, Instance.sop_instance_uid
            )
            .limit(query.limit)
            .offset(query.offset)
        )
        # Plain rows on a connection: a study's worth of ORM objects costs milliseconds.
        with self.engine.connect() as connection:
            return [InstanceSummary(**row._asdict()) for row in connection.execute(statement)]

    def instance_keys(self, study_instance_uid: str) -> list[str]:
        """The object keys of a study's instances, in series/instance order."""
        with Session(self.engine) as session:
            return list(
                session.scalars(
                    select(Instance.object_key)
                    .where(Instance.study_instance_uid == study_instance_uid)
                    .order_by(Instance.series_instance_uid, Instance.instance_number)
                )
            )

    def iter_instance_rows(self) -> Iterator[tuple[str, str, int]]:
        """(sop_instance_uid, object_key, size_bytes) of every indexed instance."""
        with Session(self.engine) as session:
            yield from session.execute(
                select(Instance.sop_instance_uid, Instance.object_key, Instance.size_bytes)
            ).tuples()

    def _due_condition(self, quiet_seconds: float, site_ids: Sequence[str] | None) -> Any:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=quiet_seconds)
        condition = and_(Study.completion_due_at.is_not(None), Study.completion_due_at <= cutoff)
        if site_ids is not None:
            condition = and_(condition, Study.site_id.in_(list(site_ids)))
        return condition

    def studies_due_for_completion(
        self, quiet_seconds: float, site_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[DueStudy]:
        """Studies whose completion is pending and which have been quiet (no instance
        indexed) for `quiet_seconds`, oldest first; of `site_ids` only (a site's worker
        completes its own studies: webhooks go to that site's receivers)."""
        with Session(self.engine) as session:
            due = session.execute(
                select(Study.study_instance_uid, Study.completion_due_at, Study.completion_attempts)
                .where(self._due_condition(quiet_seconds, site_ids))
                .order_by(Study.completion_due_at)
                .limit(limit)
            ).all()
            if not due:
                return []
            counted = session.execute(
                select(Instance.study_instance_uid, func.count())
                .where(Instance.study_instance_uid.in_([row[0] for row in due]))
                .group_by(Instance.study_instance_uid)
            )
            counts = {str(uid): int(n) for uid, n in counted}
        return [
            DueStudy(str(uid), int(counts.get(uid, 0)), due_at, int(attempts))
            for uid, due_at, attempts in due
        ]

    def completion_due(self, quiet_seconds: float, site_ids: Sequence[str] | None = None) -> bool:
        """Whether any study of `site_ids` is due for completion (one indexed lookup)."""
        with self.engine.connect() as connection:
            return (
                connection.execute(
                    select(Study.study_instance_uid)
                    .where(self._due_condition(quiet_seconds, site_ids))
                    .limit(1)
                ).first()
                is not None
            )

    def completion_counts(self, site_ids: Sequence[str] | None = None) -> tuple[int, int]:
        """(studies whose completion is pending, of which failed at least once)."""
        condition: Any = Study.completion_due_at.is_not(None)
        if site_ids is not None:
            condition = and_(condition, Study.site_id.in_(list(site_ids)))
        with self.engine.connect() as connection:
            pending, failed = connection.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((Study.completion_attempts > 0, 1), else_=0)), 0),
                ).where(condition)
            ).one()
        return int(pending), int(failed)

    def mark_completed(self, study: DueStudy) -> None:
        """Record that the completion step ran for `study`'s content: no longer pending,
        unless an instance was indexed since it was read (then due again after its quiet
        time)."""
        with Session(self.engine) as session, session.begin():
            session.execute(
                update(Study)
                .where(Study.study_instance_uid == study.study_instance_uid)
                .values(
                    completed_at=dt.datetime.now(dt.UTC),
                    completed_instance_count=study.instance_count,
                    completion_attempts=0,
                    completion_error="",
                    completion_due_at=case(
                        (Study.completion_due_at == study.due_at, None),
                        else_=Study.completion_due_at,
                    ),
                )
            )

    def mark_completion_failed(self, study: DueStudy, error: str, retry_in_seconds: float) -> None:
        """Record a failed completion run (`error`: an exception type name): pending still,
        due again in `retry_in_seconds` (counted from the end of the quiet time), unless
        an instance was indexed since (then due after its quiet time, as any); the quiet
        time is counted from then, as for any pending study."""
        retry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retry_in_seconds)
        with Session(self.engine) as session, session.begin():
            session.execute(
                update(Study)
                .where(Study.study_instance_uid == study.study_instance_uid)
                .values(
                    completion_attempts=Study.completion_attempts + 1,
                    completion_error=error[:64],
                    completion_due_at=case(
                        (Study.completion_due_at == study.due_at, retry),
                        else_=Study.completion_due_at,
                    ),
                )
            )

    def study_instances(self, study_instance_uid: str) -> list[tuple[str, str, str, str]]:
        """(series UID, SOP instance UID, SOP class UID, object key) of a study's instances."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(
                    Instance.series_instance_uid,
                    Instance.sop_instance_uid,
                    Instance.sop_class_uid,
                    Instance.object_key,
                )
                .where(Instance.study_instance_uid == study_instance_uid)
                .order_by(
                    Instance.series_instance_uid,
                    Instance.instance_number,
                    Instance.sop_instance_uid,
                )
            )
            return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]

    def instance_site(self, sop_instance_uid: str) -> str | None:
        """The site that stored an indexed instance (its owner), or None."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(Instance.site_id).where(Instance.sop_instance_uid == sop_instance_uid)
            ).scalar_one_or_none()

    def find_instance(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """(object key, sha256) of an indexed instance, or None."""
        with Session(self.engine) as session:
            row = session.execute(
                select(Instance.object_key, Instance.sha256).where(
                    Instance.sop_instance_uid == sop_instance_uid
                )
            ).first()
            return (str(row[0]), str(row[1])) if row else None

    def clear(self) -> None:
        """Delete every row (reindex rebuilds from the object store)."""
        with Session(self.engine) as session, session.begin():
            for model in (Instance, Series, Study, Patient):
                session.execute(delete(model))

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table without timestamps (to compare two indexes)."""
        skip = {
            "created_at",
            "updated_at",
            "completed_at",
            "completed_instance_count",
            "completion_due_at",
            "completion_attempts",
            "completion_error",
        }
        result: dict[str, list[dict[str, Any]]] = {}
        with Session(self.engine) as session:
            for model in (Patient, Study, Series, Instance):
                table = Base.metadata.tables[str(model.__tablename__)]
                key = next(iter(table.primary_key.columns))
                rows = session.execute(select(table).order_by(key)).mappings()
                result[table.name] = [{k: v for k, v in r.items() if k not in skip} for r in rows]
        return result

    def check(self) -> None:
        """Raise when the index database cannot answer (health check)."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
