"""Storage Commitment Push Model: a modality (pynetdicom as SCU, as modalities do) asks the
node to commit what it sent and receives the N-EVENT-REPORT on its association."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicom_node import CallerPolicy, DicomNode, NodeConfig
from tests.support.commitment import commitment_request, request_commitment
from tests.support.services import free_port


def test_spooled_instances_are_committed_and_unknown_ones_fail(
        tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, object]) -> None:
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]),
                        batch_size=0)
    archived = {"1.2.3.999.1"}  # what the archive (index) holds, by original UID
    node = DicomNode(config, lambda site, batch: None, archived=lambda uid, sites: uid in archived)
    node.start()
    try:
        files = sorted(sample_study[0].rglob("*.dcm"))[:3]
        sent = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1", str(config.port),
                               *map(str, files)], capture_output=True, timeout=60)
        assert sent.returncode == 0
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        references = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers]
        references += [(references[0][0], "1.2.3.999.1"), (references[0][0], "1.2.3.404")]
        request = commitment_request(references)
        event_type, report = request_commitment(config.port, request)
    finally:
        node.stop()
    assert event_type == 2  # some failed
    assert report.TransactionUID == request.TransactionUID
    committed = {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence}
    assert committed == {str(h.SOPInstanceUID) for h in headers} | {"1.2.3.999.1"}
    [failed] = report.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == "1.2.3.404" and failed.FailureReason == 0x0112


def test_a_request_without_transaction_uid_is_refused(tmp_path: Path) -> None:
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]))
    node = DicomNode(config, lambda site, batch: None, archived=lambda uid, sites: False)
    node.start()
    try:
        ae = AE(ae_title="CT_SALLE_1")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", config.port, ae_title="DICOMGATEWAY")
        request = commitment_request([("1.2.840.10008.5.1.4.1.1.2", "1.2.3")])
        del request.TransactionUID
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assoc.release()
        assert status.Status == 0x0115
    finally:
        node.stop()
