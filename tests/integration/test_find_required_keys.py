"""C-FIND matches the keys QIDO-RS matches (they share the queries): the date, time,
study ID and person-name keys at study level, the procedure step keys at series level and
SOP class lists at image level, driven by dcmtk's findscu over the index of
tests/support/matching_records.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node import CallerPolicy, DicomNode, NodeConfig
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from tests.support.matching_records import BASIC_TEXT_SR, CT_IMAGE, matching_records
from tests.support.services import free_port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomNode]:
    folder = tmp_path_factory.mktemp("find-keys")
    engine = create_index_engine(f"sqlite:///{folder / 'index.sqlite3'}")
    migrate(engine)
    index = IndexRepository(engine)
    index.upsert_instances(matching_records())
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=folder / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]))
    running = DicomNode(config, lambda site, batch: None, index,
                        FilesystemObjectStore(folder / "objects"))
    running.start()
    yield running
    running.stop()
    engine.dispose()


def _find(dcmtk: dict[str, str], node: DicomNode, out: Path, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-S", "-aec", "DICOMGATEWAY", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([dcmtk["findscu"], *args, "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.mark.parametrize(("key", "expected"), [
    ("StudyTime=235958-235959", ["2.25.101"]),
    ("StudyTime=-0900", ["2.25.102"]),
    ("StudyTime=1010-", ["2.25.101", "2.25.104"]),
    ("StudyID=CT1*", ["2.25.101", "2.25.104"]),
    ("ReferringPhysicianName=martin^claire", ["2.25.102"]),
    ("ReferringPhysicianName=SM*", ["2.25.101", "2.25.104"]),
])
def test_study_level_find_matches_the_required_keys(dcmtk: dict[str, str], node: DicomNode,
                                                    tmp_path: Path, key: str, expected: list[str]) -> None:
    found = _find(dcmtk, node, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=",
                  "StudyTime=", "StudyID=", "ReferringPhysicianName=", key)
    assert sorted(r.StudyInstanceUID for r in found) == expected


def test_series_level_find_matches_the_procedure_step_keys(dcmtk: dict[str, str], node: DicomNode,
                                                           tmp_path: Path) -> None:
    started = _find(dcmtk, node, tmp_path / "started", "QueryRetrieveLevel=SERIES",
                    "StudyInstanceUID=2.25.101", "SeriesInstanceUID=",
                    "PerformedProcedureStepStartDate=20240110",
                    "PerformedProcedureStepStartTime=2300-")
    assert [(r.SeriesInstanceUID, r.PerformedProcedureStepStartTime) for r in started] == [
        ("2.25.101.1", "235958")]
    requested = _find(dcmtk, node, tmp_path / "requested", "QueryRetrieveLevel=SERIES",
                      "StudyInstanceUID=2.25.101", "SeriesInstanceUID=",
                      "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS2")
    assert [r.SeriesInstanceUID for r in requested] == ["2.25.101.1"]
    early = _find(dcmtk, node, tmp_path / "early", "QueryRetrieveLevel=SERIES",
                  "StudyInstanceUID=2.25.101", "SeriesInstanceUID=",
                  "PerformedProcedureStepStartTime=-0100")
    assert [r.SeriesInstanceUID for r in early] == ["2.25.101.2"]


def test_image_level_find_matches_a_list_of_sop_classes(dcmtk: dict[str, str], node: DicomNode,
                                                        tmp_path: Path) -> None:
    found = _find(dcmtk, node, tmp_path, "QueryRetrieveLevel=IMAGE", "StudyInstanceUID=2.25.101",
                  "SOPInstanceUID=", f"SOPClassUID={BASIC_TEXT_SR}\\1.2.3")
    assert [r.SOPInstanceUID for r in found] == ["2.25.101.2.1"]
    both = _find(dcmtk, node, tmp_path / "both", "QueryRetrieveLevel=IMAGE",
                 "StudyInstanceUID=2.25.101", "SOPInstanceUID=", f"SOPClassUID={BASIC_TEXT_SR}\\{CT_IMAGE}")
    assert len(both) == 3


def test_a_time_range_across_midnight_is_refused(dcmtk: dict[str, str], node: DicomNode) -> None:
    result = subprocess.run([dcmtk["findscu"], "-v", "-S", "-aec", "DICOMGATEWAY",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=",
                             "-k", "StudyTime=2300-0100", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert "DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr
