"""The one Query/Retrieve service both protocols call: every verb answers within the
requester's scope, whatever scope a query carries, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import (
    EVERY_SITE,
    AccessScope,
    IndexRepository,
    InstanceQuery,
    QueryRetrieve,
    SeriesQuery,
    StudyQuery,
    create_index_engine,
    migrate,
)
from tests.support.index_records import study_records


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueryRetrieve]:
    url = (request.getfixturevalue("create_postgres_database")() if request.param == "postgresql"
           else f"sqlite:///{tmp_path / 'index.sqlite3'}")
    engine = create_index_engine(url)
    migrate(engine)
    index = IndexRepository(engine)
    for study, site in (("2.25.10", "siteA"), ("2.25.20", "siteA"), ("2.25.30", "siteB")):
        records = study_records(study, f"P{study[-2:]}", count=2)
        index.upsert_instances([dataclasses.replace(
            r, study={**r.study, "site_id": site}, instance={**r.instance, "site_id": site})
            for r in records])
    yield QueryRetrieve(index)
    engine.dispose()


SITE_A = AccessScope(site_ids=frozenset({"siteA"}))


def test_every_verb_answers_within_the_requesters_scope(service: QueryRetrieve) -> None:
    studies = {s.study_instance_uid for s in service.search_for_studies(SITE_A, StudyQuery())}
    assert studies == {"2.25.10", "2.25.20"}
    assert {s.study_instance_uid for s in service.search_for_series(SITE_A, SeriesQuery())} == studies
    assert {i.study_instance_uid for i in service.search_for_instances(SITE_A, InstanceQuery())} == studies
    assert service.retrieve_instances(SITE_A, ["2.25.30"], limit=10) == []
    assert len(service.retrieve_instances(SITE_A, ["2.25.10", "2.25.30"], limit=10)) == 2
    assert len(service.search_for_studies(EVERY_SITE, StudyQuery())) == 3


def test_a_query_cannot_widen_the_requesters_scope(service: QueryRetrieve) -> None:
    """The scope is the requester's: one a query carries (built elsewhere, or forged) is
    replaced, never combined or preferred."""
    wide = StudyQuery(scope=EVERY_SITE)
    assert {s.study_instance_uid for s in service.search_for_studies(SITE_A, wide)} == {
        "2.25.10", "2.25.20"}
    other = InstanceQuery(scope=AccessScope(site_ids=frozenset({"siteB"})))
    assert {i.study_instance_uid for i in service.search_for_instances(SITE_A, other)} == {
        "2.25.10", "2.25.20"}


def test_a_shares_retrieval_skips_the_studies_and_series_outside_it(service: QueryRetrieve) -> None:
    share = AccessScope(study_instance_uids=frozenset({"2.25.10", "2.25.20"}),
                        series_limits={"2.25.20": frozenset({"2.25.20.9"})})
    assert [i.study_instance_uid for i in service.retrieve_instances(
        share, ["2.25.10", "2.25.20", "2.25.30"], limit=10)] == ["2.25.10", "2.25.10"]
    assert service.retrieve_instances(share, ["2.25.20"], "2.25.20.1", limit=10) == []
    assert len(service.retrieve_instances(share, ["2.25.10"], "2.25.10.1", limit=10)) == 2
