"""The index on SQLite and on PostgreSQL, with the real Alembic migrations."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import inspect, text

from storage import (
    DateRange,
    IndexRepository,
    InstanceRecord,
    SeriesQuery,
    StudyQuery,
    create_index_engine,
    migrate,
)
from storage.index import downgrade
from tests.support.index_records import study_records
from tests.support.matching_records import request_attributes


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


@pytest.fixture
def populated(repository: IndexRepository) -> IndexRepository:
    repository.upsert_instances(study_records("2.25.100", "PAAA", "20250110", "CT", 3))
    repository.upsert_instances(study_records("2.25.200", "PBBB", "20250320", "MR", 2))
    repository.upsert_instances(study_records("2.25.300", "PAAA", "20251231", "CT", 1))
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
    populated.upsert_instances(study_records("2.25.100", "PAAA", "20250110", "CT", 3))
    [study] = populated.search_studies(StudyQuery(study_instance_uids=("2.25.100",)))
    assert (study.number_of_series, study.number_of_instances) == (1, 3)
    assert study.modalities_in_study == ("CT",)


def test_an_instance_row_keeps_its_object_and_site_and_ownership_reads_it(
        repository: IndexRepository) -> None:
    """The instance rule of the trust model, for every row of a batch: a later row naming
    another object leaves the stored one as it is; one naming the same object updates it
    but never its site. `ownership` reads back what each writer checks."""
    first = study_records("2.25.400", "PCCC", count=3)
    repository.upsert_instances(first)
    rewritten = [dataclasses.replace(r, instance={**r.instance, "size_bytes": 999,
                                                  "site_id": "site2"}) for r in first[:2]]
    hijack = dataclasses.replace(first[2], instance={
        **first[2].instance, "object_key": "studies/elsewhere.dcm", "size_bytes": 7})
    repository.upsert_instances([*rewritten, hijack])
    with repository.engine.connect() as connection:
        rows = {uid: (key, size, site) for uid, key, size, site in connection.execute(text(
            "SELECT sop_instance_uid, object_key, size_bytes, site_id FROM instances"))}
    keys = [r.instance["object_key"] for r in first]
    assert rows == {"2.25.400.1.1": (keys[0], 999, "site1"), "2.25.400.1.2": (keys[1], 999, "site1"),
                    "2.25.400.1.3": (keys[2], 100, "site1")}
    known = repository.ownership("2.25.400", "2.25.400.1", "2.25.400.1.3")
    assert (known.study_site_id, known.study_patient_id, known.series_study_instance_uid,
            known.instance_object_key) == ("site1", "PCCC", "2.25.400", keys[2])
    unknown = repository.ownership("2.25.401", "2.25.400.1", "2.25.401.1.1")
    assert (unknown.study_site_id, unknown.study_patient_id, unknown.series_study_instance_uid,
            unknown.instance_object_key) == (None, None, "2.25.400", None)


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


def test_fuzzy_patient_name_matches_word_prefixes_in_any_order(repository: IndexRepository) -> None:
    for study, name in (("2.25.401", "DUPONT^JEAN PIERRE"), ("2.25.402", "MARTIN^CLAIRE=DUPONT"),
                        ("2.25.403", "DUPONTEL^ANNE"), ("2.25.404", "LEDUPONT^JEAN")):
        records = study_records(study, f"P{study[-3:]}", "20250101", "CT", 1)
        records[0].study["patient_name"] = records[0].patient["patient_name"] = name
        repository.upsert_instances(records)

    def fuzzy(name: str) -> set[str]:
        return {s.study_instance_uid for s in repository.search_studies(
            StudyQuery(patient_name=name, fuzzy_person_names=True))}

    assert fuzzy("dupont") == {"2.25.401", "2.25.402", "2.25.403"}  # a component begins with it
    assert fuzzy("jean dupont") == {"2.25.401"}  # every word, any order
    assert fuzzy("pierre^dup") == {"2.25.401"}
    assert fuzzy("dup_nt") == set()  # SQL specials stay literal
    assert {s.study_instance_uid for s in repository.search_studies(
        StudyQuery(patient_name="dupont"))} == set()  # without fuzzy: the exact value only


def test_migration_0004_keeps_shares_items_and_sessions(repository: IndexRepository) -> None:
    """Renaming site_id to sites must not rebuild `shares` (on SQLite a rebuild drops the
    old table and its items and sessions go with it, ON DELETE CASCADE)."""
    downgrade(repository.engine, "0003")
    now = dt.datetime.now(dt.UTC)
    with repository.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO shares (share_id, token_sha256, created_at, created_by, expires_at, "
            "pin_failures, uses, allow_download, recipient, recipient_email, note, site_id) "
            "VALUES ('s1', :token, :now, 'admin', :later, 0, 0, :no, '', '', '', 'site-a')"),
            {"token": "0" * 64, "now": now, "later": now + dt.timedelta(days=1), "no": False})
        connection.execute(text("INSERT INTO share_items VALUES ('s1', '2.25.1', '')"))
        connection.execute(text("INSERT INTO share_sessions VALUES (:s, 's1', :now, :now)"),
                           {"s": "1" * 64, "now": now})
        connection.execute(text(
            "INSERT INTO api_keys (key_id, secret_sha256, name, scopes, site_id, created_at) "
            "VALUES ('k1', :h, 'PACS', 'read', 'site-a', :now)"), {"h": "2" * 64, "now": now})
    migrate(repository.engine)
    with repository.engine.begin() as connection:
        assert connection.execute(text("SELECT count(*) FROM share_items")).scalar() == 1
        assert connection.execute(text("SELECT count(*) FROM share_sessions")).scalar() == 1
        assert connection.execute(text("SELECT sites FROM shares")).scalar() == "site-a"
        connection.execute(text("UPDATE api_keys SET sites = :s"), {"s": " ".join(["site-a"] + ["x" * 60] * 3)})
    downgrade(repository.engine, "0003")  # several sites become the first (narrower), no error
    with repository.engine.begin() as connection:
        assert connection.execute(text("SELECT site_id FROM api_keys")).scalar() == "site-a"
        assert connection.execute(text("SELECT count(*) FROM share_items")).scalar() == 1
        for table in ("share_sessions", "share_items", "shares", "api_keys"):
            connection.execute(text(f"DELETE FROM {table}"))
    migrate(repository.engine)


def test_migration_0010_turns_allow_download_into_the_download_permission(
        repository: IndexRepository) -> None:
    """The boolean column becomes the permission set, in place (items and sessions stay),
    and back again on downgrade."""
    from storage import AccessRepository

    downgrade(repository.engine, "0009")
    now = dt.datetime.now(dt.UTC)
    with repository.engine.begin() as connection:
        for share_id, allowed in (("yes", True), ("no", False)):
            connection.execute(text(
                "INSERT INTO shares (share_id, token_sha256, created_at, created_by, expires_at, "
                "pin_failures, uses, allow_download, recipient, recipient_email, note) "
                "VALUES (:id, :token, :now, 'admin', :later, 0, 0, :allowed, '', '', '')"),
                {"id": share_id, "token": share_id[0] * 64, "now": now,
                 "later": now + dt.timedelta(days=1), "allowed": allowed})
            connection.execute(text("INSERT INTO share_items VALUES (:id, '2.25.1', '')"),
                               {"id": share_id})
    migrate(repository.engine)
    access = AccessRepository(repository.engine)
    shares = {s.share_id: s for s in access.list_shares()}
    assert shares["yes"].permissions == frozenset({"download"})
    assert shares["no"].permissions == frozenset()
    assert all(len(s.items) == 1 for s in shares.values())
    downgrade(repository.engine, "0009")
    with repository.engine.begin() as connection:
        kept = dict(connection.execute(text("SELECT share_id, allow_download FROM shares")).all())
        assert {k: bool(v) for k, v in kept.items()} == {"yes": True, "no": False}
        assert connection.execute(text("SELECT count(*) FROM share_items")).scalar() == 2
        for table in ("share_items", "shares"):
            connection.execute(text(f"DELETE FROM {table}"))
    migrate(repository.engine)


def test_site_limited_callers_see_only_shares_of_their_sites_studies(repository: IndexRepository) -> None:
    """Every study of the share indexed as theirs; a study not indexed (a reindex under
    way, a study deleted) hides the share: fail closed."""
    from storage import AccessRepository, ShareItemRecord, ShareRecord

    for study, site in (("2.25.501", "site-a"), ("2.25.502", "site-b")):
        records = study_records(study, f"P{study[-3:]}", "20250101", "CT", 1)
        records = [dataclasses.replace(r, study={**r.study, "site_id": site}) for r in records]
        repository.upsert_instances(records)
    access = AccessRepository(repository.engine)
    now = dt.datetime.now(dt.UTC)
    for share_id, studies in (("a", ["2.25.501"]), ("b", ["2.25.502"]), ("ab", ["2.25.501", "2.25.502"]),
                              ("gone", ["2.25.599"]), ("a-gone", ["2.25.501", "2.25.599"])):
        access.add_share(ShareRecord(
            share_id=share_id, created_at=now, created_by="admin", expires_at=now + dt.timedelta(days=1),
            revoked_at=None, pin_hash=None, pin_failures=0, locked_at=None, max_uses=None, uses=0,
            permissions=frozenset(), recipient="", recipient_email="", note="", site_ids=None,
            items=tuple(ShareItemRecord(s) for s in studies)), share_id * 8)

    def listed(*sites: str) -> set[str]:
        return {s.share_id for s in access.list_shares(site_ids=frozenset(sites))}

    assert listed("site-a") == {"a"}
    assert listed("site-a", "site-b") == {"a", "b", "ab"}
    assert listed() == set()
    assert {s.share_id for s in access.list_shares()} == {"a", "b", "ab", "gone", "a-gone"}
    assert access.share("a", frozenset({"site-a"})) is not None
    assert access.share("a", frozenset({"site-b"})) is None
    assert access.share("gone", frozenset({"site-a"})) is None and access.share("gone") is not None
    with repository.engine.begin() as connection:
        for table in ("share_items", "shares"):
            connection.execute(text(f"DELETE FROM {table}"))


def test_migration_0006_keeps_series_and_ingest_fills_their_procedure_step_keys(
        repository: IndexRepository) -> None:
    """A series indexed before 0006 keeps its row, its new keys empty (reindex fills them);
    an instance indexed after carries them from its dataset."""
    downgrade(repository.engine, "0005")
    with repository.engine.begin() as connection:
        connection.execute(text("INSERT INTO patients (patient_id, patient_name, patient_birth_date, "
                                "patient_sex) VALUES ('PFFF', '', '', '')"))
        connection.execute(text("INSERT INTO studies (study_instance_uid, patient_id, patient_name, "
                                "patient_birth_date, patient_sex, study_date, study_time, "
                                "accession_number, study_id, study_description, "
                                "referring_physician_name, specific_character_set, site_id) VALUES "
                                "('2.25.600', 'PFFF', '', '', '', '', '', '', '', '', '', '', 's')"))
        connection.execute(text("INSERT INTO series (series_instance_uid, study_instance_uid, "
                                "modality, series_description, body_part_examined) VALUES "
                                "('2.25.600.1', '2.25.600', 'CT', '', '')"))
    migrate(repository.engine)
    [old] = repository.search_series(SeriesQuery(study_instance_uid="2.25.600"))
    assert (old.performed_procedure_step_start_date, old.performed_procedure_step_start_time) == ("", "")

    [record] = study_records("2.25.700", "PGGG")
    dataset = _record_dataset(record)
    dataset.PerformedProcedureStepStartDate, dataset.PerformedProcedureStepStartTime = "20240102", "0930"
    dataset.RequestAttributesSequence = request_attributes(("S1", "R1"), ("S2", ""))
    filled = InstanceRecord.from_dataset(dataset, object_key="k", size_bytes=1, sha256="0" * 64,
                                         transfer_syntax_uid="1.2.840.10008.1.2.1", site_id="s")
    assert {k: filled.series[k] for k in ("performed_procedure_step_start_date",
                                           "performed_procedure_step_start_time",
                                           "scheduled_procedure_step_ids", "requested_procedure_ids")} == {
        "performed_procedure_step_start_date": "20240102",
        "performed_procedure_step_start_time": "0930",
        "scheduled_procedure_step_ids": "S1\\S2", "requested_procedure_ids": "R1"}
    repository.upsert_instances([filled])
    [new] = repository.search_series(SeriesQuery(study_instance_uid="2.25.700"))
    assert (new.performed_procedure_step_start_date, new.performed_procedure_step_start_time) == (
        "20240102", "0930")


def _record_dataset(record: InstanceRecord) -> Dataset:
    """The identifying attributes of an index record as a dataset."""
    dataset = Dataset()
    dataset.StudyInstanceUID = record.study["study_instance_uid"]
    dataset.SeriesInstanceUID = record.series["series_instance_uid"]
    dataset.SOPInstanceUID = record.instance["sop_instance_uid"]
    dataset.SOPClassUID = record.instance["sop_class_uid"]
    dataset.PatientID = record.patient["patient_id"]
    dataset.Modality = record.series["modality"]
    return dataset


def test_a_study_is_pending_completion_from_its_indexing_until_completed_for_that_content(
        repository: IndexRepository) -> None:
    """Durable completion: indexing makes the study pending in the same transaction;
    marking it done for what was read clears it, unless an instance came meanwhile."""
    repository.upsert_instances(study_records("2.25.500", "PDDD", count=2))
    assert repository.completion_due(0.0) and not repository.completion_due(3600.0)
    [due] = repository.studies_due_for_completion(0.0)
    assert (due.study_instance_uid, due.instance_count, due.attempts) == ("2.25.500", 2, 0)
    assert repository.completion_counts() == (1, 0)
    assert repository.studies_due_for_completion(0.0, ["another-site"]) == []
    # An instance indexed after the completion read the study: still pending.
    repository.upsert_instances(study_records("2.25.500", "PDDD", count=3))
    repository.mark_completed(due)
    [again] = repository.studies_due_for_completion(0.0)
    assert again.instance_count == 3 and again.due_at != due.due_at
    repository.mark_completed(again)
    assert repository.studies_due_for_completion(0.0) == [] and not repository.completion_due(0.0)
    assert repository.completion_counts() == (0, 0)


def test_a_failed_completion_is_counted_and_due_again_later(repository: IndexRepository) -> None:
    repository.upsert_instances(study_records("2.25.600", "PEEE", count=1))
    [due] = repository.studies_due_for_completion(0.0)
    repository.mark_completion_failed(due, "ObjectNotFound", retry_in_seconds=600)
    assert repository.completion_counts() == (1, 1)
    assert repository.studies_due_for_completion(0.0) == []  # not before its retry time
    assert repository.studies_due_for_completion(-601.0)[0].attempts == 1  # then due, counted
    with repository.engine.connect() as connection:
        error = connection.execute(text(
            "SELECT completion_error FROM studies WHERE study_instance_uid = '2.25.600'")).scalar()
    assert error == "ObjectNotFound"
    [retried] = repository.studies_due_for_completion(-601.0)
    repository.mark_completed(retried)
    assert repository.completion_counts() == (0, 0)


def test_migration_0011_makes_studies_never_completed_pending(repository: IndexRepository) -> None:
    repository.upsert_instances(study_records("2.25.700", "PFFF", count=2))
    repository.upsert_instances(study_records("2.25.800", "PGGG", count=1))
    downgrade(repository.engine, "0010")
    with repository.engine.begin() as connection:  # 2.25.800 was completed for its content
        connection.execute(text("UPDATE studies SET completed_instance_count = 1 "
                                "WHERE study_instance_uid = '2.25.800'"))
    migrate(repository.engine)
    assert [d.study_instance_uid for d in repository.studies_due_for_completion(0.0)] == [
        "2.25.700"]
    with repository.engine.connect() as connection:  # in place: no table copy cascaded
        assert connection.execute(text("SELECT count(*) FROM instances")).scalar() == 3
    # The time the migration wrote is the one read back and compared: completed, cleared.
    [due] = repository.studies_due_for_completion(0.0)
    repository.mark_completed(due)
    assert not repository.completion_due(0.0) and repository.completion_counts() == (0, 0)
