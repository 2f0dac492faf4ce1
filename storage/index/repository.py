"""The index repository: upsert what the worker stored, answer study-level queries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Engine, Select, and_, delete, exists, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.index.models import Base, Instance, Patient, Series, Study


def _text(dataset: Dataset, keyword: str, limit: int) -> str:
    value = dataset.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def _int(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


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
    ) -> InstanceRecord:
        """Extract the indexed attributes of a de-identified dataset."""
        study_uid = _text(dataset, "StudyInstanceUID", 64)
        series_uid = _text(dataset, "SeriesInstanceUID", 64)
        return cls(
            patient={
                "patient_id": _text(dataset, "PatientID", 64),
                "patient_name": _text(dataset, "PatientName", 324),
                "patient_birth_date": _text(dataset, "PatientBirthDate", 8),
                "patient_sex": _text(dataset, "PatientSex", 16),
            },
            study={
                "study_instance_uid": study_uid,
                "patient_id": _text(dataset, "PatientID", 64),
                "patient_name": _text(dataset, "PatientName", 324),
                "patient_birth_date": _text(dataset, "PatientBirthDate", 8),
                "patient_sex": _text(dataset, "PatientSex", 16),
                "study_date": _text(dataset, "StudyDate", 8),
                "study_time": _text(dataset, "StudyTime", 16),
                "accession_number": _text(dataset, "AccessionNumber", 16),
                "study_id": _text(dataset, "StudyID", 16),
                "study_description": _text(dataset, "StudyDescription", 64),
                "referring_physician_name": _text(dataset, "ReferringPhysicianName", 324),
                "specific_character_set": _text(dataset, "SpecificCharacterSet", 128),
                "site_id": site_id[:64],
            },
            series={
                "series_instance_uid": series_uid,
                "study_instance_uid": study_uid,
                "modality": _text(dataset, "Modality", 16),
                "series_number": _int(dataset, "SeriesNumber"),
                "series_description": _text(dataset, "SeriesDescription", 64),
                "body_part_examined": _text(dataset, "BodyPartExamined", 16),
            },
            instance={
                "sop_instance_uid": _text(dataset, "SOPInstanceUID", 64),
                "series_instance_uid": series_uid,
                "study_instance_uid": study_uid,
                "sop_class_uid": _text(dataset, "SOPClassUID", 64),
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
            },
        )


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


@dataclass(frozen=True)
class AccessScope:
    """What a caller may see: a site's studies, a share's studies, some series of them.
    Every query applies it in SQL, so limit/offset and counts stay right."""

    site_id: str | None = None
    #: None: every study (of the site).
    study_instance_uids: frozenset[str] | None = None
    #: Studies shared only in part -> the series of each that are shared.
    series_limits: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def allows(self, study_instance_uid: str, series_instance_uid: str | None = None) -> bool:
        """The study/series is inside the scope (the site is checked by the queries)."""
        if self.study_instance_uids is not None and study_instance_uid not in self.study_instance_uids:
            return False
        limits = self.series_limits.get(study_instance_uid)
        return series_instance_uid is None or limits is None or series_instance_uid in limits

    def conditions(self, study_column: Any, series_column: Any | None = None) -> list[Any]:
        found: list[Any] = []
        if self.site_id is not None:
            found.append(study_column.in_(select(Study.study_instance_uid)
                                          .where(Study.site_id == self.site_id)))
        if self.study_instance_uids is not None:
            found.append(study_column.in_(sorted(self.study_instance_uids) or ["-"]))
        if series_column is not None and self.series_limits:
            allowed = sorted(set().union(*self.series_limits.values()))
            found.append(or_(study_column.not_in(sorted(self.series_limits)),
                             series_column.in_(allowed)))
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
    limit: int = 100
    offset: int = 0
    scope: AccessScope | None = None


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
    """Series-level matching keys."""

    study_instance_uid: str | None = None
    series_instance_uids: tuple[str, ...] = ()
    modality: str | None = None
    series_number: int | None = None
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


@dataclass(frozen=True)
class InstanceQuery:
    """Instance-level matching keys."""

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    sop_class_uid: str | None = None
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


def _wildcard(column: Any, pattern: str, *, case_insensitive: bool = False) -> Any:
    """PS3.4 wildcard matching: '*' any run, '?' one character; SQL specials escaped."""
    if "*" not in pattern and "?" not in pattern:
        return func.upper(column) == pattern.upper() if case_insensitive else column == pattern
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = escaped.replace("*", "%").replace("?", "_")
    if case_insensitive:
        return func.upper(column).like(like.upper(), escape="\\")
    return column.like(like, escape="\\")


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

    def _upsert(self, session: Session, model: Any, values: dict[str, Any], key: str) -> None:
        statement = self._insert(model).values(**values)
        updates = {name: statement.excluded[name] for name in values if name != key}
        updates["updated_at"] = func.now()
        session.execute(statement.on_conflict_do_update(index_elements=[key], set_=updates))

    def upsert_instance(self, record: InstanceRecord) -> None:
        """Insert or update the study, series and instance rows (idempotent)."""
        self.upsert_instances([record])

    def upsert_instances(self, records: Sequence[InstanceRecord]) -> None:
        """Upsert several instances in one transaction (idempotent)."""
        # One statement per distinct parent row (a batch is mostly one study and series).
        patients = {r.patient["patient_id"]: r.patient for r in records}
        studies = {r.study["study_instance_uid"]: r.study for r in records}
        series = {r.series["series_instance_uid"]: r.series for r in records}
        with Session(self.engine) as session, session.begin():
            for values in patients.values():
                self._upsert(session, Patient, values, "patient_id")
            for values in studies.values():
                self._upsert(session, Study, values, "study_instance_uid")
            for values in series.values():
                self._upsert(session, Series, values, "series_instance_uid")
            for record in records:
                self._upsert(session, Instance, record.instance, "sop_instance_uid")

    def _filtered(self, query: StudyQuery) -> Select[Any]:
        statement = select(Study.__table__)
        conditions: list[Any] = []
        if query.patient_id:
            conditions.append(_wildcard(Study.patient_id, query.patient_id))
        if query.patient_name:
            conditions.append(_wildcard(Study.patient_name, query.patient_name, case_insensitive=True))
        if query.accession_number:
            conditions.append(_wildcard(Study.accession_number, query.accession_number))
        if query.study_date is not None:
            if query.study_date.start:
                conditions.append(Study.study_date >= query.study_date.start)
            if query.study_date.end:
                conditions.append(Study.study_date <= query.study_date.end)
            conditions.append(Study.study_date != "")
        if query.study_instance_uids:
            conditions.append(Study.study_instance_uid.in_(query.study_instance_uids))
        if query.modalities:
            conditions.append(
                exists().where(
                    and_(
                        Series.study_instance_uid == Study.study_instance_uid,
                        or_(*[Series.modality == m for m in query.modalities]),
                    )
                )
            )
        if query.scope is not None:
            conditions += query.scope.conditions(Study.study_instance_uid)
        return statement.where(*conditions)

    def search_studies(self, query: StudyQuery) -> list[StudySummary]:
        """Matching studies, newest first, with their series/instance counts and modalities."""
        # One statement with correlated counts, on a plain connection: three round trips and
        # the ORM's identity map cost more than the query itself.
        # A share of some series of a study counts (and lists modalities of) those only.
        limits = (AccessScope(series_limits=query.scope.series_limits)
                  if query.scope is not None and query.scope.series_limits else None)
        series_limit = limits.conditions(Series.study_instance_uid, Series.series_instance_uid) if limits else []
        instance_limit = (limits.conditions(Instance.study_instance_uid, Instance.series_instance_uid)
                          if limits else [])
        series_count = (select(func.count())
                        .where(Series.study_instance_uid == Study.study_instance_uid, *series_limit)
                        .correlate(Study).scalar_subquery())
        instance_count = (select(func.count())
                          .where(Instance.study_instance_uid == Study.study_instance_uid, *instance_limit)
                          .correlate(Study).scalar_subquery())
        modalities = (select(func.aggregate_strings(Series.modality, "\\"))
                      .where(Series.study_instance_uid == Study.study_instance_uid, *series_limit)
                      .correlate(Study).scalar_subquery())
        statement = (
            self._filtered(query)
            .add_columns(series_count.label("n_series"), instance_count.label("n_instances"),
                         modalities.label("modalities"))
            .order_by(Study.study_date.desc(), Study.study_time.desc(), Study.study_instance_uid)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            studies = connection.execute(statement).all()
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
            for s in studies
        ]

    def count_studies(self, query: StudyQuery) -> int:
        """How many studies match, ignoring limit and offset."""
        statement = select(func.count()).select_from(self._filtered(query).subquery())
        with Session(self.engine) as session:
            return int(session.scalar(statement) or 0)

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
        if query.scope is not None:
            conditions += query.scope.conditions(Series.study_instance_uid, Series.series_instance_uid)
        counts = (select(Instance.series_instance_uid.label("uid"), func.count().label("n"))
                  .group_by(Instance.series_instance_uid).subquery())
        statement = (
            select(Series, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.uid == Series.series_instance_uid)
            .where(*conditions)
            .order_by(Series.study_instance_uid, Series.series_number, Series.series_instance_uid)
            .limit(query.limit).offset(query.offset)
        )
        with Session(self.engine) as session:
            return [
                SeriesSummary(s.study_instance_uid, s.series_instance_uid, s.modality,
                              s.series_number, s.series_description, s.body_part_examined, int(n))
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
        if query.sop_class_uid:
            conditions.append(Instance.sop_class_uid == query.sop_class_uid)
        if query.instance_number is not None:
            conditions.append(Instance.instance_number == query.instance_number)
        if query.scope is not None:
            conditions += query.scope.conditions(Instance.study_instance_uid,
                                                 Instance.series_instance_uid)
        statement = (
            select(Instance, Series.modality)
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(*conditions)
            .order_by(Instance.series_instance_uid, Instance.instance_number,
                      Instance.sop_instance_uid)
            .limit(query.limit).offset(query.offset)
        )
        with Session(self.engine) as session:
            return [
                InstanceSummary(
                    i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid,
                    i.sop_class_uid, i.instance_number, i.rows, i.columns, i.number_of_frames,
                    i.transfer_syntax_uid, i.object_key, i.size_bytes, i.sha256, modality or "",
                    i.updated_at)
                for i, modality in session.execute(statement)
            ]

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

    def studies_due_for_completion(self, quiet_seconds: float) -> list[tuple[str, int]]:
        """(study UID, instance count) of studies unchanged for `quiet_seconds` whose
        completion step has not run for their current content."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=quiet_seconds)
        counts = (
            select(Instance.study_instance_uid.label("uid"), func.count().label("n"),
                   func.max(Instance.updated_at).label("last"))
            .group_by(Instance.study_instance_uid)
            .subquery()
        )
        statement = (
            select(Study.study_instance_uid, counts.c.n, counts.c.last)
            .join(counts, counts.c.uid == Study.study_instance_uid)
            .where(or_(Study.completed_instance_count.is_(None),
                       Study.completed_instance_count != counts.c.n))
        )
        due = []
        with Session(self.engine) as session:
            for uid, count, last in session.execute(statement):
                if last is not None and last.tzinfo is None:
                    last = last.replace(tzinfo=dt.UTC)  # SQLite returns naive UTC
                if last is None or last <= cutoff:
                    due.append((str(uid), int(count)))
        return due

    def mark_completed(self, study_instance_uid: str, instance_count: int) -> None:
        """Record that the completion step ran for `instance_count` instances."""
        with Session(self.engine) as session, session.begin():
            study = session.get(Study, study_instance_uid)
            if study is not None:
                study.completed_at = dt.datetime.now(dt.UTC)
                study.completed_instance_count = instance_count

    def study_instances(self, study_instance_uid: str) -> list[tuple[str, str, str, str]]:
        """(series UID, SOP instance UID, SOP class UID, object key) of a study's instances."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(Instance.series_instance_uid, Instance.sop_instance_uid,
                       Instance.sop_class_uid, Instance.object_key)
                .where(Instance.study_instance_uid == study_instance_uid)
                .order_by(Instance.series_instance_uid, Instance.instance_number,
                          Instance.sop_instance_uid)
            )
            return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]

    def find_instance(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """(object key, sha256) of an indexed instance, or None."""
        with Session(self.engine) as session:
            row = session.execute(
                select(Instance.object_key, Instance.sha256)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
            return (str(row[0]), str(row[1])) if row else None

    def clear(self) -> None:
        """Delete every row (reindex rebuilds from the object store)."""
        with Session(self.engine) as session, session.begin():
            for model in (Instance, Series, Study, Patient):
                session.execute(delete(model))

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table without timestamps (to compare two indexes)."""
        skip = {"created_at", "updated_at", "completed_at", "completed_instance_count"}
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
