"""Write-back through `dicom-gateway serve` (issue 18): what a PACS, a viewer or an AI tool
sends back — by C-STORE (dcmtk's storescu) and by STOW-RS — lands in the stored study,
under its patient, with its own UIDs; a stored instance sent back adds nothing; Storage
Commitment covers both; the STOW-RS answer names what is searchable right away."""

from __future__ import annotations

import json
import subprocess
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import Dataset

from gateway.sample_study import SampleStudySpec
from tests.e2e.test_end_to_end import _serve, _storescu, _wait_for_study
from tests.support.commitment import commitment_request, request_commitment
from tests.support.services import free_port, wait_for
from tests.support.writeback import basic_text_sr, segmentation, stow, to_bytes


def _retrieve(base: str, token: str, study: str) -> list[Dataset]:
    """The study's instances as a client retrieves them (WADO-RS, one part per instance)."""
    headers = {"Authorization": f"Bearer {token}"}
    found = httpx.get(f"{base}/studies/{study}/instances", headers=headers, timeout=30).json()
    datasets = []
    for item in found:
        series, sop = item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
        answer = httpx.get(f"{base}/studies/{study}/series/{series}/instances/{sop}", timeout=30,
                           headers={**headers, "Accept": "application/dicom"})
        assert answer.status_code == 200, answer.text
        datasets.append(pydicom.dcmread(BytesIO(answer.content)))
    return datasets


def test_write_back_by_c_store_and_stow_lands_in_the_stored_study(
        tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec]) -> None:
    folder, spec = sample_study
    total = spec.ct_slices + spec.mr_slices
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with _serve(tmp_path, data_dir, dicom_port, http_port):
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        _storescu(dcmtk, dicom_port, folder)
        study = _wait_for_study(http_port, token, total)
        study_uid = study["0020000D"]["Value"][0]  # type: ignore[index]
        patient = study["00100020"]["Value"][0]  # type: ignore[index]
        base = f"http://127.0.0.1:{http_port}/dicom-web"
        stored = _retrieve(base, token, study_uid)
        ct = sorted((d for d in stored if d.Modality == "CT"), key=lambda d: int(d.InstanceNumber))

        # C-STORE: a stored instance sent back as retrieved, and a report written on it
        back = tmp_path / "back"
        back.mkdir()
        report = basic_text_sr(ct, "No change since the prior study.")
        (back / "returned.dcm").write_bytes(to_bytes(ct[0]))
        (back / "report.dcm").write_bytes(to_bytes(report))
        _storescu(dcmtk, dicom_port, back)
        after = _wait_for_study(http_port, token, total + 1)
        assert after["0020000D"]["Value"] == [study_uid]  # type: ignore[index]
        assert after["00100020"]["Value"] == [patient]  # type: ignore[index]
        headers = {"Authorization": f"Bearer {token}"}
        studies = httpx.get(f"{base}/studies", headers=headers, timeout=30).json()
        assert len(studies) == 1  # no second study, no second patient
        found = httpx.get(f"{base}/studies/{study_uid}/instances",
                          params={"SOPInstanceUID": str(report.SOPInstanceUID)}, headers=headers).json()
        assert [item["0020000E"]["Value"][0] for item in found] == [str(report.SeriesInstanceUID)]

        # Storage Commitment covers the write-back and the instance sent back
        wait_for(lambda: not list((data_dir / "spool").rglob("*.dcm")), timeout=60, what="spool emptied")
        event_type, committed = request_commitment(dicom_port, commitment_request(
            [(str(report.SOPClassUID), str(report.SOPInstanceUID)),
             (str(ct[0].SOPClassUID), str(ct[0].SOPInstanceUID))]))
        assert event_type == 1 and "FailedSOPSequence" not in committed

        # STOW-RS into the study: the answer names the stored UIDs, searchable at once
        seg = segmentation(ct)
        answer = stow(f"{base}/studies/{study_uid}", headers, [seg])
        assert answer.status_code in (200, 202), answer.text
        document = answer.json()
        [item] = document["00081199"]["Value"]
        assert item["00081155"]["Value"] == [str(seg.SOPInstanceUID)]
        assert document["00081190"]["Value"] == [f"{base}/studies/{study_uid}"]
        retrieved = httpx.get(item["00081190"]["Value"][0], timeout=30,
                              headers={**headers, "Accept": "application/dicom"})
        assert retrieved.status_code == 200
        assert pydicom.dcmread(BytesIO(retrieved.content)).Modality == "SEG"
        series = httpx.get(f"{base}/studies/{study_uid}/series", headers=headers, timeout=30).json()
        assert {s["00080060"]["Value"][0] for s in series} == {"CT", "MR", "SR", "SEG"}
    result = subprocess.run(["grep", "-rl", "No change since", str(data_dir / "spool")],
                            capture_output=True)
    assert result.stdout == b""  # nothing of it left in the spool
