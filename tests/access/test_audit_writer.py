"""The audit writer batches events off the request path and loses none it was given."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from storage import AccessRepository, AuditEntry, AuditQuery, create_index_engine, migrate
from access import audit_entry
from web_viewer_api.audit import AuditWriter


def _repository(path: Path) -> AccessRepository:
    engine = create_index_engine(f"sqlite:///{path / 'index.sqlite3'}")
    migrate(engine)
    return AccessRepository(engine)


def test_queued_events_reach_the_database_in_order_at_close(tmp_path: Path) -> None:
    access = _repository(tmp_path)
    writer = AuditWriter(access, interval=3600)  # nothing flushes on its own during the test
    writer.submit([audit_entry("dicomweb.search", "admin", resource=f"/dicom-web/studies?n={n}")
                   for n in range(500)])
    writer.submit([audit_entry("share.create", "key:abc")])
    assert access.search_audit(AuditQuery(limit=1000)) == []
    writer.close()
    stored = access.search_audit(AuditQuery(limit=1000, newest_first=False))
    assert [e.resource for e in stored[:3]] == [f"/dicom-web/studies?n={n}" for n in range(3)]
    assert len(stored) == 501 and stored[-1].action == "share.create"


def test_a_refused_write_keeps_the_events_for_the_next_flush(tmp_path: Path) -> None:
    access = _repository(tmp_path)
    writer = AuditWriter(access, interval=3600)
    writer.submit([audit_entry("auth.failure", "anonymous", outcome=4, address="10.0.0.9")])
    with access.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE audit_events RENAME TO audit_events_away")
    with pytest.raises(OperationalError):
        writer.flush()
    with access.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE audit_events_away RENAME TO audit_events")
    writer.flush()
    assert [e.address for e in access.search_audit(AuditQuery())] == ["10.0.0.9"]


def test_dimse_events_are_stored_bounded_and_without_control_characters(tmp_path: Path) -> None:
    from storage import dimse_entry

    event = dimse_entry("dimse.find", "ae:PACS\r\nFORGED", "10.0.0.1\n" * 20,
                        study_instance_uid="2.25." + "1" * 80)
    assert (event.event_code, event.event_action) == ("110112", "E")
    access = _repository(tmp_path)
    access.append_audit([event])
    [stored] = access.search_audit(AuditQuery())
    assert stored.actor == "ae:PACS??FORGED" and "\n" not in stored.address
    assert len(stored.address) <= 64 and len(stored.study_instance_uid) == 64


def test_the_node_audit_never_raises_into_a_dimse_operation() -> None:
    from dicom_node import CallerPolicy, NodeAudit

    class Refusing(AuditWriter):
        def submit(self, events: list[AuditEntry]) -> None:
            raise RuntimeError("queue gone")

    caller = CallerPolicy.build(["127.0.0.0/8"]).caller("MODALITY", "127.0.0.1", "site1")
    NodeAudit(Refusing(AccessRepository(create_index_engine("sqlite://")))).record(
        "dimse.store", caller, 0, studies={"2.25.1"})
