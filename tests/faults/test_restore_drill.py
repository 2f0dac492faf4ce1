"""Restore drill on PostgreSQL, as docs/admin/backup.md describes it: the index is
rebuilt from the object store alone (`reindex`) into an empty database, and what cannot be
rebuilt — shares, API keys, the audit trail — comes back from a pg_dump."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.importer import run_import
from gateway.sample_study import SampleStudySpec, write_sample_study
from spool import Spool
from storage import (
    AccessRepository,
    AuditQuery,
    FilesystemObjectStore,
    IndexRepository,
    ShareItemRecord,
    ShareRecord,
    StudyQuery,
    create_index_engine,
    migrate,
)
from access import audit_entry, sha256_hex
from worker import IngestPipeline
from worker.reindex import reindex


def _libpq(url: str) -> list[str]:
    parsed = make_url(url)
    return ["-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432), "-U", parsed.username or "postgres"]


def test_drop_the_database_then_reindex_and_restore_the_access_tables(
        tmp_path: Path, create_postgres_database: Callable[[], str]) -> None:
    original_url = create_postgres_database()
    engine = create_index_engine(original_url)
    migrate(engine)
    store = FilesystemObjectStore(tmp_path / "objects")
    pipeline = IngestPipeline(store, IndexRepository(engine),
                              DeidentificationPolicy(PseudonymKeys(b"d" * 32), "site1"),
                              tmp_path / "spool", tmp_path / "quarantine")
    for seed in (1, 2):
        write_sample_study(tmp_path / f"s{seed}", SampleStudySpec(ct_slices=3, mr_slices=1, ct_size=32,
                                                                   mr_size=32, seed=seed))
    run_import([tmp_path / "s1", tmp_path / "s2"], pipeline, Spool(tmp_path / "spool", "site1"))
    access = AccessRepository(engine)
    study = pipeline.index.search_studies(StudyQuery())[0].study_instance_uid
    now = dt.datetime.now(dt.UTC)
    access.add_share(ShareRecord(
        share_id="drill00000000001", created_at=now, created_by="admin", expires_at=now + dt.timedelta(days=1),
        revoked_at=None, pin_hash=None, pin_failures=0, locked_at=None, max_uses=None, uses=0,
        permissions=frozenset(), recipient="Dr Drill", recipient_email="", note="", site_ids=None,
        items=(ShareItemRecord(study),)), sha256_hex("drill-token"))
    access.append_audit([audit_entry("share.create", "admin", share_id="drill00000000001")])
    index_before = pipeline.index.dump()
    dump = tmp_path / "access.dump"
    subprocess.run(["pg_dump", *_libpq(original_url), "-Fc", "-t", "shares", "-t", "share_items",
                    "-t", "share_sessions", "-t", "api_keys", "-t", "audit_events", "-f", str(dump),
                    make_url(original_url).database], check=True, capture_output=True, timeout=120)
    engine.dispose()

    # The database is lost: a new, empty one, the schema, the objects' index, the dump.
    restored_url = create_postgres_database()
    restored = create_index_engine(restored_url)
    migrate(restored)
    report = reindex(store, IndexRepository(restored))
    assert report.unreadable == [] and report.indexed == 8
    assert IndexRepository(restored).dump() == index_before
    subprocess.run(["pg_restore", *_libpq(restored_url), "--data-only", "--disable-triggers",
                    "-d", make_url(restored_url).database, str(dump)], check=True, capture_output=True,
                   timeout=120)
    back = AccessRepository(restored)
    share = back.share_by_token(sha256_hex("drill-token"))
    assert share is not None and share.recipient == "Dr Drill" and share.items[0].study_instance_uid == study
    assert [e.action for e in back.search_audit(AuditQuery())] == ["share.create"]
