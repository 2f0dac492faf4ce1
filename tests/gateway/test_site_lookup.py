"""`dicom-gateway lookup` at a producing site, and the audit trail's handling of what
callers send (query values withheld, caller-made paths replaced by their route)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from anonymize import PseudonymKeys, pseudonymize_accession_number
from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from web_viewer_api.audit import _trusted_path, _withheld_query

pytestmark = pytest.mark.slow  # most of its tests start the CLI in a process

SECRET = "site-lookup-secret-0123456789"


def _run(data_dir: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {"DICOM_GATEWAY_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "DICOM_GATEWAY_PSEUDONYM_SECRET": SECRET,
           **{f"DICOM_GATEWAY_{k.upper()}": v for k, v in settings.items()}}
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    write_sample_study(root / "study", SampleStudySpec(
        ct_slices=2, mr_slices=1, ct_size=64, mr_size=64,
        identity=PlantedIdentity(accession_number="ACCLOOKUP42", patient_id="IPP-LOOKUP-42")))
    imported = _run(root / "data", "import", str(root / "study"))
    assert imported.returncode == 0, imported.stderr
    return root / "data"


def test_lookup_prints_pseudonyms_and_the_matching_study(site: Path) -> None:
    result = _run(site, "lookup", "--accession-number", "ACCLOOKUP42")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    expected = pseudonymize_accession_number(PseudonymKeys(SECRET.encode()), "ACCLOOKUP42",
                                             site_id="site1", issuer="")
    assert answer["pseudonyms"] == [{"site": "site1", "accession_number": expected,
                                     "patient_id": None}]
    [study] = answer["study_uids"]
    connection = sqlite3.connect(site / "index.sqlite3")
    try:
        assert connection.execute("SELECT accession_number FROM studies WHERE study_instance_uid = ?",
                                  (study,)).fetchone() == (expected,)
        [(detail, resource)] = connection.execute(
            "SELECT detail, resource FROM audit_events WHERE action = 'study.lookup'").fetchall()
    finally:
        connection.close()
    assert json.loads(detail) == {"matches": 1, "sites": ["site1"]}  # counts, no identifier
    assert "ACCLOOKUP42" not in detail + resource
    assert "ACCLOOKUP42" not in result.stderr
    # another site's accession pseudonym is another: nothing found there
    elsewhere = _run(site, "lookup", "--accession-number", "ACCLOOKUP42", "--site", "other")
    assert json.loads(elsewhere.stdout)["study_uids"] == []


def test_lookup_without_site_searches_every_site_the_index_holds(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A study another site produced (its accession keyed by that site) is found without
    naming the site; the pseudonyms are computed for each site the index holds."""
    root = tmp_path_factory.mktemp("two-sites")
    for site_id, accession, seed in (("site1", "ACC-HERE-1", 1), ("hopital-b", "ACC-THERE-2", 2)):
        write_sample_study(root / site_id, SampleStudySpec(
            ct_slices=1, mr_slices=0, ct_size=32, seed=seed,
            identity=PlantedIdentity(accession_number=accession, patient_id=f"IPP-{seed}")))
        imported = _run(root / "data", "import", str(root / site_id), site_id=site_id)
        assert imported.returncode == 0, imported.stderr
    result = _run(root / "data", "lookup", "--accession-number", "ACC-THERE-2")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [p["site"] for p in answer["pseudonyms"]] == ["hopital-b", "site1"]
    [found] = answer["study_uids"]
    connection = sqlite3.connect(root / "data" / "index.sqlite3")
    try:
        assert connection.execute("SELECT site_id FROM studies WHERE study_instance_uid = ?",
                                  (found,)).fetchone() == ("hopital-b",)
    finally:
        connection.close()
    named = _run(root / "data", "lookup", "--accession-number", "ACC-THERE-2", "--site", "site1")
    assert json.loads(named.stdout)["study_uids"] == []  # keyed by the producing site


def test_lookup_is_refused_at_the_region_and_without_identifiers(site: Path) -> None:
    result = _run(site, "lookup", "--accession-number", "ACCLOOKUP42", http__role="region")
    assert result.returncode == 2 and "never at the region" in result.stderr
    result = _run(site, "lookup")
    assert result.returncode == 2 and "--accession-number" in result.stderr


@pytest.mark.parametrize(("query", "kept"), [
    ("PatientID=IPP-4711&limit=10", "PatientID=(withheld)&limit=10"),
    ("limit=IPP-4711&offset=5", "limit=(withheld)&offset=5"),
    ("includefield=PatientName,00100020&fuzzymatching=true", "includefield=PatientName,00100020&fuzzymatching=true"),
    ("includefield=DUPONT", "includefield=(withheld)"),
    ("00100020=284076322011986", "00100020=(withheld)"),
    ("IPP-4711=HOPITAL", "(withheld)"),
    ("study_uid=1.2.3&action=share.view", "study_uid=(withheld)&action=(withheld)"),
    ("", ""),
])
def test_audit_withholds_query_values_but_paging_and_form(query: str, kept: str) -> None:
    assert _withheld_query(query) == kept


@pytest.mark.parametrize(("method", "route", "status", "trusted"), [
    ("GET", "/dicom-web/studies/{study}/metadata", 200, True),
    ("GET", "/dicom-web/studies/{study}/metadata", 404, False),
    ("GET", "/dicom-web/studies/{study}/series", 200, False),  # a search matches nothing, 200
    ("POST", "/dicom-web/studies/{study}", 200, False),  # the uploader's (original) UID
    ("GET", "/api/shares/{share_id}", 200, True),
    ("GET", "", 404, False),  # no such route
])
def test_audit_keeps_a_path_only_when_it_named_what_the_index_holds(
        method: str, route: str, status: int, trusted: bool) -> None:
    assert _trusted_path(method, route, status) is trusted
