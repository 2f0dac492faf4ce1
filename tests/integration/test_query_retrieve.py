"""C-FIND, C-MOVE and C-GET over the de-identified archive, driven by dcmtk's findscu,
movescu (with storescp as the destination) and getscu."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node import CallerPolicy, DicomNode, MoveDestination, NodeConfig
from imaging import Codec
from storage import InstanceQuery, StudyQuery
from tests.support.dicomweb_server import DicomwebServer
from tests.support.services import free_port, wait_for
from tests.support.storescp import running_storescp


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    """Three de-identified studies (the sample study and two more) in a real index/store,
    stored JPEG-LS: dcmtk 3.6.7 (the destination below) knows JPEG-LS and not HTJ2K, the
    default, which it would get decompressed like any uncompressed-only destination."""
    yield DicomwebServer(tmp_path_factory.mktemp("qr"), studies=3, codec=Codec.JPEG_LS)


@pytest.fixture(scope="module")
def destination_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(archive: DicomwebServer, destination_port: int,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomNode]:
    config = NodeConfig(
        ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
        spool_root=tmp_path_factory.mktemp("spool"), policy=CallerPolicy.build(["127.0.0.0/8"]),
        move_destinations={"STORESCP": MoveDestination("STORESCP", "127.0.0.1", destination_port)})
    running = DicomNode(config, lambda site, batch: None, archive.index, archive.store)
    running.start()
    yield running
    running.stop()


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def _find(dcmtk: dict[str, str], node: DicomNode, out: Path, *keys: str,
          model: str = "-S") -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = [model, "-aec", "DICOMGATEWAY", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = _run(dcmtk["findscu"], *args, "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_study_level_find_matches_and_returns_the_keys(dcmtk: dict[str, str], node: DicomNode,
                                                       archive: DicomwebServer, tmp_path: Path) -> None:
    studies = archive.index.search_studies(StudyQuery())
    everything = _find(dcmtk, node, tmp_path / "all", "QueryRetrieveLevel=STUDY", "StudyInstanceUID=",
                       "PatientID=", "StudyDate=", "ModalitiesInStudy=", "NumberOfStudyRelatedInstances=")
    assert {r.StudyInstanceUID for r in everything} == {s.study_instance_uid for s in studies}
    target = studies[0]
    match = next(r for r in everything if r.StudyInstanceUID == target.study_instance_uid)
    assert match.PatientID == target.patient_id
    assert int(match.NumberOfStudyRelatedInstances) == target.number_of_instances
    assert list(match.ModalitiesInStudy) == list(target.modalities_in_study)
    assert match.RetrieveAETitle == "DICOMGATEWAY" and match.QueryRetrieveLevel == "STUDY"
    one = _find(dcmtk, node, tmp_path / "one", "QueryRetrieveLevel=STUDY", "StudyInstanceUID=",
                f"PatientID={target.patient_id}")
    assert [r.StudyInstanceUID for r in one] == [s.study_instance_uid for s in studies
                                                if s.patient_id == target.patient_id]
    wildcard = _find(dcmtk, node, tmp_path / "wild", "QueryRetrieveLevel=STUDY",
                     "StudyInstanceUID=", f"PatientID={target.patient_id[:4]}*")
    assert target.study_instance_uid in {r.StudyInstanceUID for r in wildcard}
    dated = _find(dcmtk, node, tmp_path / "date", "QueryRetrieveLevel=STUDY", "StudyInstanceUID=",
                  "StudyDate=19000101-19000102")
    assert dated == []


def test_series_image_and_patient_levels(dcmtk: dict[str, str], node: DicomNode,
                                         archive: DicomwebServer, tmp_path: Path) -> None:
    study = next(s for s in archive.index.search_studies(StudyQuery()) if s.number_of_instances == 6)
    series = _find(dcmtk, node, tmp_path / "series", "QueryRetrieveLevel=SERIES",
                   f"StudyInstanceUID={study.study_instance_uid}", "SeriesInstanceUID=", "Modality=",
                   "NumberOfSeriesRelatedInstances=")
    assert sorted((r.Modality, int(r.NumberOfSeriesRelatedInstances)) for r in series) == [("CT", 4), ("MR", 2)]
    ct = next(r for r in series if r.Modality == "CT")
    images = _find(dcmtk, node, tmp_path / "images", "QueryRetrieveLevel=IMAGE",
                   f"StudyInstanceUID={study.study_instance_uid}",
                   f"SeriesInstanceUID={ct.SeriesInstanceUID}", "SOPInstanceUID=", "InstanceNumber=")
    assert sorted(int(r.InstanceNumber) for r in images) == [1, 2, 3, 4]
    patients = _find(dcmtk, node, tmp_path / "patients", "QueryRetrieveLevel=PATIENT",
                     f"PatientID={study.patient_id}", "NumberOfPatientRelatedStudies=", model="-P")
    assert len(patients) == 1 and int(patients[0].NumberOfPatientRelatedStudies) >= 1


def test_find_without_a_level_is_refused(dcmtk: dict[str, str], node: DicomNode, tmp_path: Path) -> None:
    result = _run(dcmtk["findscu"], "-v", "-S", "-aec", "DICOMGATEWAY", "-k", "QueryRetrieveLevel=WARD",
                  "-k", "StudyInstanceUID=", "127.0.0.1", str(node.port))
    assert "DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr


@pytest.fixture
def storescp(dcmtk: dict[str, str], destination_port: int, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[Path]:
    """dcmtk's storescp as the move destination: uncompressed only unless parametrized +xa."""
    with running_storescp(dcmtk["storescp"], destination_port, tmp_path / "received",
                          getattr(request, "param", [])) as out:
        yield out


@pytest.mark.parametrize("storescp", [[], ["+xa"]], indirect=True, ids=["uncompressed-only", "accept-all"])
def test_move_sends_the_study_to_the_destination(dcmtk: dict[str, str], node: DicomNode,
                                                 archive: DicomwebServer, storescp: Path,
                                                 request: pytest.FixtureRequest) -> None:
    """As stored (JPEG-LS) when the destination accepts it, decompressed when it accepts only
    uncompressed syntaxes; the pixels are the archive's either way."""
    accepts_all = bool(request.node.callspec.params["storescp"])
    study = next(s for s in archive.index.search_studies(StudyQuery()) if s.number_of_instances == 6)
    result = _run(dcmtk["movescu"], "-S", "-aec", "DICOMGATEWAY", "-aem", "STORESCP",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_instance_uid}",
                  "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(list(storescp.glob("*"))) == 6, timeout=30, what="6 instances at storescp")
    stored = {i.sop_instance_uid: i for i in archive.index.search_instances(
        InstanceQuery(study_instance_uid=study.study_instance_uid))}
    for path in sorted(storescp.glob("*")):
        dataset = pydicom.dcmread(path)
        instance = stored[dataset.SOPInstanceUID]
        original = pydicom.dcmread(archive.store.root / instance.object_key)
        assert np.array_equal(dataset.pixel_array, original.pixel_array)
        expected = instance.transfer_syntax_uid if accepts_all else None
        if expected is not None:
            assert dataset.file_meta.TransferSyntaxUID == expected
        else:
            assert not dataset.file_meta.TransferSyntaxUID.is_compressed


def test_move_to_an_unknown_destination_is_refused(dcmtk: dict[str, str], node: DicomNode,
                                                   archive: DicomwebServer) -> None:
    study = archive.index.search_studies(StudyQuery())[0]
    result = _run(dcmtk["movescu"], "-v", "-S", "-aec", "DICOMGATEWAY", "-aem", "NOWHERE",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_instance_uid}",
                  "127.0.0.1", str(node.port))
    assert "Refused: MoveDestinationUnknown" in result.stdout + result.stderr


def test_get_returns_the_series_on_the_same_association(dcmtk: dict[str, str], node: DicomNode,
                                                        archive: DicomwebServer, tmp_path: Path) -> None:
    study = next(s for s in archive.index.search_studies(StudyQuery()) if s.number_of_instances == 6)
    instances = archive.index.search_instances(InstanceQuery(study_instance_uid=study.study_instance_uid))
    series = next(i.series_instance_uid for i in instances if i.modality == "MR")
    out = tmp_path / "got"
    out.mkdir()
    result = _run(dcmtk["getscu"], "-S", "-aec", "DICOMGATEWAY", "-od", str(out),
                  "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.study_instance_uid}",
                  "-k", f"SeriesInstanceUID={series}", "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID for p in out.glob("*")}
    assert got == {i.sop_instance_uid for i in instances if i.series_instance_uid == series}
