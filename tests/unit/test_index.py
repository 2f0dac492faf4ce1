"""The index on SQLite and on PostgreSQL, with the real Alembic migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from storage import DateRange, IndexRepository, InstanceRecord, StudyQuery, create_index_engine, migrate
from storage.index import downgrade
from gateway.sample_study import SampleStudySpec, build_sample_study


@pytest.fixture(params=["sqlite", "postgresql"])
def repository(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IndexRepository]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = create_index_engine(url)
    migrate(engine)
    yield IndexRepository(engine)
    with engine.begin() as connection:  # leave the shared PostgreSQL database empty
        connection.execute(text("DELETE FROM instances"))
        connection.execute(text("DELETE FROM series"))
        connection.execute(text("DELETE FROM studies"))
    engine.dispose()


def _records(study: str, patient: str, date: str, modality: str, count: int) -> list[InstanceRecord]:
    records = []
    for dataset in build_sample_study(SampleStudySpec(ct_slices=count, mr_slices=0, ct_size=16)):
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = f"{study}.1"
        dataset.SOPInstanceUID = f"{study}.1.{dataset.InstanceNumber}"
        dataset.PatientID = patient
        dataset.PatientName = f"ANONYMOUS^{patient}"
        dataset.StudyDate = date
        dataset.Modality = modality
        records.append(InstanceRecord.from_dataset(
            dataset, object_key=f"studies/{study}/x/{dataset.InstanceNumber}.dcm",
            size_bytes=100, sha256="0" * 64, transfer_syntax_uid="1.2.840.10008.1.2.1",
            site_id="site1"))
    return records


@pytest.fixture
def populated(repository: IndexRepository) -> IndexRepository:
    repository.upsert_instances(_records("2.25.100", "PAAA", "20250110", "CT", 3))
    repository.upsert_instances(_records("2.25.200", "PBBB", "20250320", "MR", 2))
    repository.upsert_instances(_records("2.25.300", "PAAA", "20251231", "CT", 1))
    return repository


def _uids(repository: IndexRepository, **query: object) -> list[str]:
    return [s.study_instance_uid for s in repository.search_studies(StudyQuery(**query))]  # type: ignore[arg-type]


def test_migrations_create_the_schema_and_step_back(repository: IndexRepository) -> None:
    tables = set(inspect(repository.engine).get_table_names())
    assert {"studies", "series", "instances", "alembic_version"} <= tables
    downgrade(repository.engine, "base")
    assert "studies" not in inspect(repository.engine).get_table_names()
    migrate(repository.engine)
    assert "studies" in inspect(repository.engine).get_table_names()


def test_upsert_is_idempotent_and_counts_are_aggregated(populated: IndexRepository) -> None:
    populated.upsert_instances(_records("2.25.100", "PAAA", "20250110", "CT", 3))
    [study] = populated.search_studies(StudyQuery(study_instance_uids=("2.25.100",)))
    assert (study.number_of_series, study.number_of_instances) == (1, 3)
    assert study.modalities_in_study == ("CT",)


def test_matching_on_patient_date_range_modality_and_uid_list(populated: IndexRepository) -> None:
    assert _uids(populated, patient_id="PAAA") == ["2.25.300", "2.25.100"]
    assert _uids(populated, patient_name="anonymous^pb*") == ["2.25.200"]
    assert _uids(populated, study_date=DateRange.parse("20250101-20250331")) == ["2.25.200", "2.25.100"]
    assert _uids(populated, study_date=DateRange.parse("20250301-")) == ["2.25.300", "2.25.200"]
    assert _uids(populated, study_date=DateRange.parse("-20250110")) == ["2.25.100"]
    assert _uids(populated, modalities=("MR",)) == ["2.25.200"]
    assert _uids(populated, study_instance_uids=("2.25.100", "2.25.300")) == ["2.25.300", "2.25.100"]


def test_limit_and_offset_page_through_the_results(populated: IndexRepository) -> None:
    assert _uids(populated, limit=2) == ["2.25.300", "2.25.200"]
    assert _uids(populated, limit=2, offset=2) == ["2.25.100"]
    assert populated.count_studies(StudyQuery(patient_id="PAAA")) == 2


def test_wildcards_do_not_treat_sql_specials_as_patterns(populated: IndexRepository) -> None:
    assert _uids(populated, patient_id="P%") == []
    assert _uids(populated, patient_id="P_AA") == []
    assert _uids(populated, patient_id="P?AA") == ["2.25.300", "2.25.100"]


def test_bad_date_range_is_rejected() -> None:
    with pytest.raises(ValueError):
        DateRange.parse("2025-01-01")
    with pytest.raises(ValueError):
        DateRange.parse("20251332")
