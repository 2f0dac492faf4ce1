"""POST /api/site/lookup against a real server whose index holds several producing sites, on
SQLite and PostgreSQL: without `site` a lookup searches every site the caller may read, and
a patient known by the INS is still found by the local ID it had beside it (issue 18,
item 5)."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymize import PseudonymKeys, pseudonymize_patient_id
from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from spool import Spool
from storage import ApiKeyRecord
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from access import new_api_key, sha256_hex
from worker import read_local_patient_id
from worker.reindex import reindex

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
#: The DRIM-M sample's INS (a test patient's INS-NIR), and the way DRIM-M writes it.
INS = "279035121518989"


def _drim_m(item: Dataset) -> None:
    """PID-3 `279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS`."""
    item.PatientID, item.IssuerOfPatientID = INS, "ASIP-SANTE-INS-NIR"
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.250.1.213.1.4.10", "ISO"
    qualifier.IdentifierTypeCode = "INS"
    item.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])


def _ingest(server: DicomwebServer, folder: Path, site: str, seed: int, *, local_id: str,
            accession: str, ins: str | None) -> str:
    """One study produced by `site` through the pipeline: the patient's local ID (no
    issuer: the site's), with the INS as the DRIM-M writes it among the other IDs when
    `ins`, an accession number without issuer (keyed by the site). Its de-identified UID."""
    write_sample_study(folder, SampleStudySpec(
        ct_slices=1, mr_slices=0, ct_size=32, seed=seed, with_ins=False,
        identity=PlantedIdentity(patient_id=local_id, accession_number=accession)))
    spool = Spool(server.pipeline.spool_root, site)
    for path in folder.rglob("*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.IssuerOfPatientID
        if ins:
            other = Dataset()
            _drim_m(other)
            dataset.OtherPatientIDsSequence = Sequence([other])
        dataset.save_as(path, enforce_file_format=True)
        spool.write(f"{site}-{seed}", str(dataset.SOPInstanceUID), path.read_bytes())
    report = server.pipeline.ingest_batch(site, f"{site}-{seed}")
    assert report.stored == 1 and report.quarantined == 0
    [study] = report.stored_study_uids
    return study


class Sites:
    """A site API (default site `site1`) over an index of three producing sites."""

    def __init__(self, server: DicomwebServer, root: Path) -> None:
        self.server = server
        #: Hospital B: the patient with the INS beside the local ID IPP-77.
        self.b = _ingest(server, root / "b", "hopital-b", 501, local_id="IPP-77",
                         accession="ACC-B-77", ins=INS)
        #: Hospital C: another patient whose local ID is also IPP-77 (no INS).
        self.c = _ingest(server, root / "c", "hopital-c", 502, local_id="IPP-77",
                         accession="ACC-C-77", ins=None)
        #: Hospital D: the patient of B again, known there by another local ID.
        self.d = _ingest(server, root / "d", "hopital-d", 503, local_id="D-0042",
                         accession="ACC-D-42", ins=INS)

    def lookup(self, headers: dict[str, str] | None = None, **body: str) -> list[str]:
        answer = httpx.post(f"{self.server.root}/api/site/lookup", headers=headers or ADMIN,
                            json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert set(answer.json()) == {"study_uids", "studies"}  # never a pseudonym
        return sorted(answer.json()["study_uids"])

    def key(self, sites: set[str]) -> dict[str, str]:
        key_id, key = new_api_key()
        self.server.access.add_api_key(ApiKeyRecord(
            key_id, "lookup", frozenset({"share"}), frozenset(sites), dt.datetime.now(dt.UTC),
            None, sha256_hex(key)))
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          create_postgres_database: Callable[[], str]) -> Iterator[Sites]:
    root = tmp_path_factory.mktemp(f"lookup-{request.param}")
    url = create_postgres_database() if request.param == "postgresql" else None
    with DicomwebServer(root / "server", database_url=url) as server:
        yield Sites(server, root)


def test_an_accession_number_is_found_at_whichever_site_produced_it(sites: Sites) -> None:
    assert sites.lookup(accession_number="ACC-B-77") == [sites.b]  # no `site`: every site
    assert sites.lookup(accession_number="ACC-D-42") == [sites.d]
    assert sites.lookup(accession_number="ACC-B-77", site="hopital-b") == [sites.b]
    # keyed by the producing site: named at another, it is another accession number
    assert sites.lookup(accession_number="ACC-B-77", site="site1") == []
    assert sites.lookup(accession_number="ACC-NOWHERE") == []


def test_a_caller_limited_to_some_sites_finds_only_theirs(sites: Sites) -> None:
    clerk_b = sites.key({"hopital-b", "hopital-c"})
    assert sites.lookup(clerk_b, accession_number="ACC-B-77") == [sites.b]
    assert sites.lookup(clerk_b, accession_number="ACC-D-42") == []  # D is not its site
    assert sites.lookup(sites.key({"hopital-d"}), accession_number="ACC-B-77") == []
    answer = httpx.post(f"{sites.server.root}/api/site/lookup", headers=clerk_b, timeout=30,
                        json={"accession_number": "ACC-D-42", "site": "hopital-d"})
    assert answer.status_code == 403


def test_the_local_id_beside_the_ins_still_finds_the_study(sites: Sites) -> None:
    # B's local ID (no issuer: B's own) finds B's study, though its patient is the INS's
    assert sites.lookup(patient_id="IPP-77", site="hopital-b") == [sites.b]
    # ...and C's IPP-77 is another patient, C's, whose study carried no INS
    assert sites.lookup(patient_id="IPP-77", site="hopital-c") == [sites.c]
    # without `site`, a local ID without issuer is looked up at each site: both hospitals'
    assert sites.lookup(patient_id="IPP-77") == sorted([sites.b, sites.c])
    assert sites.lookup(patient_id="D-0042") == [sites.d]
    # the INS, however the RIS names its issuer, finds the patient's studies at B and D
    for issuer in ("1.2.250.1.213.1.4.10", "ASIP-SANTE-INS-NIR"):
        assert sites.lookup(patient_id=INS, issuer_of_patient_id=issuer) == sorted([sites.b, sites.d])
    # both identifiers: the study that has both
    assert sites.lookup(patient_id="IPP-77", accession_number="ACC-B-77") == [sites.b]
    assert sites.lookup(patient_id="IPP-77", accession_number="ACC-D-42") == []


def test_the_site_api_default_study_is_found_by_its_local_id_and_issuer(sites: Sites) -> None:
    """The server's own sample study: local ID with its issuer, the INS among the other IDs."""
    who = PlantedIdentity()
    [by_ins] = sites.lookup(patient_id=who.ins, issuer_of_patient_id=who.ins_issuer)
    assert sites.lookup(patient_id=who.patient_id,
                        issuer_of_patient_id=who.issuer_of_patient_id) == [by_ins]
    assert sites.lookup(patient_id=who.patient_id) == []  # its issuer qualifies it, not a site


def test_stored_objects_carry_the_local_ids_pseudonym_never_the_original(sites: Sites) -> None:
    [key] = sites.server.index.instance_keys(sites.b)
    body = sites.server.store.get(key)
    stored = pydicom.dcmread(io.BytesIO(body))
    expected = pseudonymize_patient_id(PseudonymKeys(b"w" * 32), "IPP-77", site_id="hopital-b")
    assert read_local_patient_id(stored) == expected
    assert stored.PatientID == pseudonymize_patient_id(PseudonymKeys(b"w" * 32), INS, site_id="",
                                                       is_ins=True)
    assert b"IPP-77" not in body and INS.encode() not in body
    assert "OtherPatientIDsSequence" not in stored  # removed, as PS3.15 says (X)
    [c_key] = sites.server.index.instance_keys(sites.c)
    assert read_local_patient_id(pydicom.dcmread(io.BytesIO(sites.server.store.get(c_key)))) == ""


def test_reindex_restores_the_local_id_from_the_stored_objects(sites: Sites) -> None:
    before = sites.server.index.dump()["studies"]
    assert {row["local_patient_id"] != "" for row in before} == {True, False}  # C has none
    sites.server.index.clear()
    assert sites.lookup(patient_id="IPP-77", site="hopital-b") == []
    reindex(sites.server.store, sites.server.index)
    assert sites.server.index.dump()["studies"] == before
    assert sites.lookup(patient_id="IPP-77", site="hopital-b") == [sites.b]
