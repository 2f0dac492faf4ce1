"""The DICOM node against real peers: dcmtk's echoscu/storescu and a pynetdicom SCU."""

from __future__ import annotations

import queue
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from anonymize import DeidentificationPolicy, PseudonymKeys
from dicom_node import CallerCredential, CallerPolicy, DicomNode, NodeConfig, Right
from gateway.sample_study import SampleStudySpec, write_sample_study
from imaging import EchoStatus, StoreStatus
from storage import (
    FilesystemObjectStore,
    IndexRepository,
    StudyQuery,
    create_index_engine,
    migrate,
)
from tests.support.services import free_port, wait_for
from worker import IngestPipeline


class _Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[str, str]] = []
        self.event = threading.Event()

    def __call__(self, site_id: str, batch_id: str) -> None:
        self.batches.append((site_id, batch_id))
        self.event.set()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[DicomNode, _Recorder]]:
    recorder = _Recorder()
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"]), batch_size=0)
    dicom_node = DicomNode(config, recorder)  # one batch per study, at release (chunks: below)
    dicom_node.start()
    yield dicom_node, recorder
    dicom_node.stop()


def _store_folder(dcmtk: dict[str, str], port: int, folder: Path) -> subprocess.CompletedProcess[bytes]:
    """storescu of a folder's files, recursively, in one association."""
    return subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "+sd", "+r", "127.0.0.1",
                           str(port), str(folder)], capture_output=True, timeout=120)


def _spooled(dicom_node: DicomNode) -> list[Path]:
    return sorted(dicom_node.spool.site_dir.glob("*/*.dcm"))


def test_echoscu_succeeds(node: tuple[DicomNode, _Recorder], dcmtk: dict[str, str]) -> None:
    dicom_node, _ = node
    result = subprocess.run([dcmtk["echoscu"], "-aec", "DICOMGATEWAY", "127.0.0.1",
                             str(dicom_node.port)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_storescu_study_is_spooled_then_enqueued_once_per_study(
    node: tuple[DicomNode, _Recorder], dcmtk: dict[str, str],
    sample_study: tuple[Path, SampleStudySpec],
) -> None:
    dicom_node, recorder = node
    folder, spec = sample_study
    result = _store_folder(dcmtk, dicom_node.port, folder)
    assert result.returncode == 0, result.stderr
    assert recorder.event.wait(10)
    spooled = _spooled(dicom_node)
    assert len(spooled) == spec.ct_slices + spec.mr_slices
    assert len(recorder.batches) == 1 and recorder.batches[0][0] == "site1"
    assert {p.parent.name for p in spooled} == {recorder.batches[0][1]}
    original = pydicom.dcmread(next(folder.glob("CT0001.dcm")))
    copy = dicom_node.spool.site_dir / recorder.batches[0][1] / f"{original.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(copy).PixelData == original.PixelData


def _garbled_file(tmp_path: Path) -> Path:
    """Valid file meta and UIDs, then an element that claims more bytes than exist."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta)
    def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
        return struct.pack("<HH2sH", group, elem, vr, len(value) if length is None else length) + value

    body = (element(0x0008, 0x0016, b"UI", str(CTImageStorage).encode() + b"\x00")
            + element(0x0008, 0x0018, b"UI", b"1.2.3.4.5.6\x00")
            + element(0x0010, 0x0010, b"PN", b"TRUNC", length=0x7FF0))
    path = tmp_path / "garbled.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + body)
    return path


def _send(port: int, payload: object) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [pydicom.uid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATEWAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(payload)
        return int(status.Status)
    finally:
        assoc.release()


def test_unparseable_dataset_gets_a_failure_status_and_the_node_keeps_serving(
    node: tuple[DicomNode, _Recorder], tmp_path: Path, dcmtk: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dicom_node, _ = node
    # pynetdicom's own option to send a file's bytes as they are, without re-encoding them.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assert _send(dicom_node.port, _garbled_file(tmp_path)) == StoreStatus.CANNOT_UNDERSTAND
    assert _spooled(dicom_node) == []
    echo = subprocess.run([dcmtk["echoscu"], "-aec", "DICOMGATEWAY", "127.0.0.1",
                           str(dicom_node.port)], capture_output=True, timeout=30)
    assert echo.returncode == 0


def test_instance_uid_mismatch_is_refused(node: tuple[DicomNode, _Recorder],
                                          sample_study: tuple[Path, SampleStudySpec]) -> None:
    dicom_node, _ = node
    folder, _ = sample_study
    dataset = pydicom.dcmread(folder / "CT0001.dcm")
    del dataset.StudyInstanceUID
    assert _send(dicom_node.port, dataset) == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert _spooled(dicom_node) == []


def test_disk_failure_answers_out_of_resources(node: tuple[DicomNode, _Recorder],
                                                sample_study: tuple[Path, SampleStudySpec]) -> None:
    dicom_node, _ = node
    dicom_node.spool.site_dir.parent.mkdir(parents=True, exist_ok=True)
    dicom_node.spool.site_dir.write_text("not a directory")  # the spool cannot be written
    folder, _ = sample_study
    assert _send(dicom_node.port, pydicom.dcmread(folder / "CT0001.dcm")) == StoreStatus.OUT_OF_RESOURCES


def test_host_outside_the_allowed_networks_is_refused(tmp_path: Path) -> None:
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["10.99.0.0/16"]))
    dicom_node = DicomNode(config, _Recorder())
    dicom_node.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", dicom_node.port, ae_title="DICOMGATEWAY")
        assert not assoc.is_established
    finally:
        dicom_node.stop()


def test_a_batch_is_claimed_while_written_and_recorded_when_handed_over(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """The node holds each batch's claim from its first instance until it has handed it
    over and recorded it (with the broker identity the enqueue returns): a node that dies
    in between leaves an unclaimed, unrecorded batch, which the workers' recovery loop
    sends at once (tests/spool); a batch left by a crashed node is not the node's to sweep."""
    from spool import BatchClaim, read_pending

    leftover = tmp_path / "spool" / "site1" / "20260101T000000-crashed"
    leftover.mkdir(parents=True)
    (leftover / "1.2.3.dcm").write_bytes(b"x")
    folder, _spec = sample_study
    held_at_hand_over: list[bool] = []

    def enqueue(site_id: str, batch_id: str) -> str:
        claim = BatchClaim.acquire(tmp_path / "spool" / site_id / batch_id, wait=False)
        held_at_hand_over.append(claim is None)
        if claim is not None:
            claim.release()
        return "broker-identity-1"

    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"]), batch_size=0)
    dicom_node = DicomNode(config, enqueue)
    dicom_node.start()
    try:
        result = _store_folder(dcmtk, dicom_node.port, folder)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(held_at_hand_over) == 1, timeout=30, what="the hand-over")
    finally:
        dicom_node.stop()
    assert held_at_hand_over == [True]
    [batch] = [p for p in (tmp_path / "spool" / "site1").iterdir() if p != leftover]
    record = read_pending(batch)
    assert record is not None and record.state == "queued" and record.epoch == "broker-identity-1"
    released = BatchClaim.acquire(batch, wait=False)
    assert released is not None
    released.release()
    assert read_pending(leftover) is None  # left for the workers' recovery loop


def test_a_long_study_is_handed_over_in_chunks_during_the_association(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    folder, spec = sample_study
    recorder = _Recorder()
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"]), batch_size=5)
    dicom_node = DicomNode(config, recorder)
    dicom_node.start()
    try:
        result = _store_folder(dcmtk, dicom_node.port, folder)
        assert result.returncode == 0, result.stderr
        total = spec.ct_slices + spec.mr_slices
        expected_batches = -(-total // 5)
        from tests.support.services import wait_for

        wait_for(lambda: len(recorder.batches) == expected_batches, timeout=10,
                 what="every chunk to be enqueued")
    finally:
        dicom_node.stop()
    batches = [batch for _, batch in recorder.batches]
    assert len(set(batches)) == expected_batches
    sizes = sorted(len(list((dicom_node.spool.site_dir / b).glob("*.dcm"))) for b in batches)
    assert sizes == sorted([5] * (total // 5) + ([total % 5] if total % 5 else []))


def test_metrics_and_one_log_line_per_association(tmp_path: Path, dcmtk: dict[str, str],
                                                  sample_study: tuple[Path, object],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import urllib.request

    metrics_port = free_port()
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"]), metrics_port=metrics_port)
    dicom_node = DicomNode(config, _Recorder())
    dicom_node.start()
    try:
        files = sorted(sample_study[0].rglob("*.dcm"))[:5]
        with caplog.at_level("INFO", logger="dicom_node.handlers"):
            result = subprocess.run([dcmtk["storescu"], "-aet", "CT_SALLE_1", "-aec", "DICOMGATEWAY",
                                     "127.0.0.1", str(config.port), *map(str, files)],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            wait_for(lambda: "association closed" in caplog.text, timeout=10, what="the association log")
        spooled = sum(p.stat().st_size for p in dicom_node.spool.site_dir.glob("*/*.dcm"))
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in scraped.splitlines()
                  if line and not line.startswith("#")}
        assert values['dicom_gateway_dimse_instances_received_total{site="site1"}'] == 5
        assert values['dicom_gateway_dimse_bytes_received_total{site="site1"}'] == spooled
        assert values['dicom_gateway_dimse_associations_total{outcome="released",site="site1"}'] == 1
        line = next(r.getMessage() for r in caplog.records if "association closed" in r.getMessage())
        assert "calling_ae=CT_SALLE_1" in line and "stored=5" in line and f"bytes={spooled}" in line
        assert "outcome=released" in line
    finally:
        dicom_node.stop()


def _large_file(tmp_path: Path, pixel_bytes: int, claimed: int | None = None) -> Path:
    """A CT instance with `pixel_bytes` of Pixel Data (claiming `claimed` bytes)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.7"
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta)

    def short(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    body = (short(0x0008, 0x0016, b"UI", str(CTImageStorage).encode() + b"\x00")
            + short(0x0008, 0x0018, b"UI", b"1.2.3.4.5.7\x00")
            + short(0x0020, 0x000D, b"UI", b"1.2.3.4.5.8\x00")
            + short(0x0020, 0x000E, b"UI", b"1.2.3.4.5.9\x00")
            + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, claimed or pixel_bytes))
    path = tmp_path / "large.dcm"
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM" + buffer.getvalue() + body)
        handle.writelines(b"\x01\x02" * (1 << 19) for _ in range(pixel_bytes // (1 << 20)))
    return path


def test_a_large_instance_is_streamed_to_the_spool_not_held_in_memory(
    node: tuple[DicomNode, _Recorder], tmp_path: Path, dcmtk: dict[str, str],
) -> None:
    import tracemalloc

    dicom_node, _ = node
    source = _large_file(tmp_path, 64 << 20)
    tracemalloc.start()  # the node runs in this process; the sender (storescu) does not
    try:
        sent = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1",
                               str(dicom_node.port), str(source)], capture_output=True, timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent.returncode == 0, sent.stderr
    [spooled] = _spooled(dicom_node)
    sent_bytes, kept = source.read_bytes(), spooled.read_bytes()
    dataset_start = b"\x08\x00\x16\x00UI"  # the first element after the file meta
    assert kept[kept.index(dataset_start):] == sent_bytes[sent_bytes.index(dataset_start):]
    assert peak < 8 << 20, f"peak {peak / 1e6:.0f} MB for a 64 MB instance"


def test_a_truncated_large_element_is_refused(node: tuple[DicomNode, _Recorder], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dicom_node, _ = node
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assert _send(dicom_node.port, _large_file(tmp_path, 2 << 20, claimed=8 << 20)) == StoreStatus.CANNOT_UNDERSTAND
    assert _spooled(dicom_node) == []


def test_wrong_called_or_calling_ae_title_is_rejected_at_association(tmp_path: Path,
                                                                     dcmtk: dict[str, str]) -> None:
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"], ["CT_SALLE_1"], callers={
                            "PACS_A": CallerCredential(frozenset({"site1"}), frozenset(Right))}))
    dicom_node = DicomNode(config, _Recorder())
    dicom_node.start()
    try:
        def echo(calling: str, called: str) -> str:
            result = subprocess.run([dcmtk["echoscu"], "-v", "-aet", calling, "-aec", called,
                                     "127.0.0.1", str(config.port)], capture_output=True, text=True,
                                    timeout=30)
            return result.stdout + result.stderr

        assert "Received Echo Response (Success)" in echo("CT_SALLE_1", "DICOMGATEWAY")
        assert "Called AE Title Not Recognized" in echo("CT_SALLE_1", "OTHERNODE")
        assert "Calling AE Title Not Recognized" in echo("INTRUDER", "DICOMGATEWAY")
        # a caller configured in DICOM__CALLERS is allowed too
        assert "Received Echo Response (Success)" in echo("PACS_A", "DICOMGATEWAY")
    finally:
        dicom_node.stop()


def test_garbage_on_the_socket_is_dropped_and_the_node_keeps_serving(
        node: tuple[DicomNode, _Recorder], dcmtk: dict[str, str]) -> None:
    import socket

    dicom_node, _ = node
    for payload in (b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"x" * 64,   # A-ASSOCIATE-RQ, absurd length
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",               # not DICOM at all
                    b"\x04\x00\x00\x00\x00\x10" + b"\x00" * 16):         # P-DATA before association
        with socket.create_connection(("127.0.0.1", dicom_node.port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass  # the node answers (abort/reject) or closes; it never hangs
    echo = subprocess.run([dcmtk["echoscu"], "-aec", "DICOMGATEWAY", "127.0.0.1",
                           str(dicom_node.port)], capture_output=True, timeout=30)
    assert echo.returncode == 0


def test_calling_ae_mapped_to_a_site_files_its_studies_under_that_site(
        tmp_path: Path, dcmtk: dict[str, str]) -> None:
    """Two hospitals send through one node: each caller's batch goes to its site's spool
    and queue, and its local patient IDs are qualified by that site when de-identified."""
    from anonymize import DeidentificationPolicy, PseudonymKeys, pseudonymize_patient_id
    from gateway.sample_study import PlantedIdentity, write_sample_study
    from storage import (
        FilesystemObjectStore,
        IndexRepository,
        StudyQuery,
        create_index_engine,
        migrate,
    )
    from worker import IngestPipeline

    recorder = _Recorder()
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site-a", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"]),
                        calling_ae_sites={"CT_HOPITAL_B": "site-b"})
    dicom_node = DicomNode(config, recorder)
    dicom_node.start()
    identity = PlantedIdentity(patient_id="12345", issuer_of_patient_id="")
    studies = {}
    try:
        for calling, seed in (("CT_HOPITAL_B", 71), ("CT_HOPITAL_A", 72)):
            folder = tmp_path / calling
            write_sample_study(folder, SampleStudySpec(ct_slices=2, mr_slices=0, ct_size=64, seed=seed,
                                                       identity=identity, with_ins=False))
            result = subprocess.run([dcmtk["storescu"], "-aet", calling, "-aec", "DICOMGATEWAY", "+sd",
                                     "127.0.0.1", str(config.port), str(folder)], capture_output=True, timeout=60)
            assert result.returncode == 0, result.stderr
            studies[calling] = str(pydicom.dcmread(next(folder.rglob("*.dcm"))).StudyInstanceUID)
        wait_for(lambda: len(recorder.batches) == 2, timeout=10, what="both batches enqueued")
    finally:
        dicom_node.stop()
    assert sorted(site for site, _ in recorder.batches) == ["site-a", "site-b"]
    assert list((tmp_path / "spool" / "site-b").glob("*/*.dcm"))
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    index = IndexRepository(engine)
    keys = PseudonymKeys(b"k" * 32)
    pipeline = IngestPipeline(FilesystemObjectStore(tmp_path / "objects"), index,
                              DeidentificationPolicy(keys, "site-a"), tmp_path / "spool", tmp_path / "q")
    for site, batch in recorder.batches:
        assert pipeline.ingest_batch(site, batch).stored == 2
    from sqlalchemy import text

    with engine.connect() as connection:
        by_site = dict(connection.execute(text("SELECT site_id, patient_id FROM studies")).all())
    assert set(by_site) == {"site-a", "site-b"}
    for site in ("site-a", "site-b"):
        assert by_site[site] == pseudonymize_patient_id(keys, "12345", site_id=site)
    assert by_site["site-a"] != by_site["site-b"]
    assert len(index.search_studies(StudyQuery())) == 2


def test_stopping_drains_the_open_association_and_refuses_new_ones(
        tmp_path: Path, dcmtk: dict[str, str]) -> None:
    from gateway.sample_study import write_sample_study

    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]))
    dicom_node = DicomNode(config, _Recorder())
    dicom_node.start()
    files = sorted(write_sample_study(tmp_path / "long", SampleStudySpec(ct_slices=150, mr_slices=0, seed=9)))
    sender = subprocess.Popen([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1", str(config.port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(_spooled(dicom_node)) >= 2, timeout=30, what="the association under way")
    dicom_node.stop()  # returns once the open association is over
    assert len(_spooled(dicom_node)) == len(files)
    output, _ = sender.communicate(timeout=60)
    assert sender.returncode == 0, output  # it finished normally, not aborted
    late = subprocess.run([dcmtk["echoscu"], "-aec", "DICOMGATEWAY", "127.0.0.1", str(config.port)],
                          capture_output=True, timeout=30)
    assert late.returncode != 0  # no new associations once stopping


def test_idle_connections_from_one_address_do_not_lock_out_the_others(tmp_path: Path) -> None:
    """Review finding: 32 idle TCP connections used to fill every association slot for about
    a minute ("Local limit exceeded" for everyone). Now one address holds at most
    `max_associations_per_address` connections, and a connection that sends no
    A-ASSOCIATE-RQ is closed after `association_request_timeout` (ARTIM)."""
    import socket
    import time

    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]),
                        maximum_associations=32, max_associations_per_address=4,
                        association_request_timeout=2.0)
    node = DicomNode(config, lambda site, batch: None)
    node.start()
    idle: list[socket.socket] = []
    try:
        for _ in range(40):  # from another loopback address, as another host would
            connection = socket.socket()
            connection.bind(("127.0.0.2", 0))
            connection.connect(("127.0.0.1", node.port))
            idle.append(connection)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMGATEWAY")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == EchoStatus.SUCCESS
        assoc.release()
        assert time.monotonic() - started < 2.0

        def closed_by_node(connection: socket.socket) -> bool:
            connection.settimeout(0.05)
            try:
                return connection.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        # the connections beyond the address's share are closed at once, the rest at ARTIM
        wait_for(lambda: sum(closed_by_node(c) for c in idle) >= 36, timeout=1.5,
                 what="connections over the per-address limit closed")
        wait_for(lambda: all(closed_by_node(c) for c in idle), timeout=10,
                 what="idle connections closed after the ARTIM timeout")
    finally:
        for connection in idle:
            connection.close()
        node.stop()


def test_an_audit_database_that_refuses_writes_never_fails_a_c_store(
        tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec]) -> None:
    """The audit trail is written from a background thread: its database refusing (here:
    no tables) is logged and retried, and C-STORE still answers Success."""
    from storage import AccessRepository, AuditWriter, create_index_engine

    broken = AuditWriter(AccessRepository(create_index_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")))
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]))
    node = DicomNode(config, lambda site, batch: None, audit=broken)
    node.start()
    try:
        files = sorted(sample_study[0].rglob("*.dcm"))[:3]
        sent = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1", str(node.port),
                               *map(str, files)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert len(list(node.spool.site_dir.glob("*/*.dcm"))) == 3
        wait_for(lambda: broken._pending, timeout=10, what="the association's audit event queued")
    finally:
        node.stop()


def test_batch_ids_sent_to_the_broker_cannot_confirm_an_original_study_uid(
    node: tuple[DicomNode, _Recorder], dcmtk: dict[str, str],
    sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """The batch id names the study by an HMAC under a key that never leaves the node
    (an unkeyed sha256 let whoever reads the broker test a candidate UID), one batch per
    study per association still."""
    import hashlib

    dicom_node, recorder = node
    folder, _ = sample_study
    for _association in range(2):
        recorder.event.clear()
        result = _store_folder(dcmtk, dicom_node.port, folder)
        assert result.returncode == 0, result.stderr
        assert recorder.event.wait(10)
    study = str(pydicom.dcmread(next(folder.glob("CT0001.dcm"))).StudyInstanceUID)
    unkeyed = hashlib.sha256(study.encode()).hexdigest()
    assert len(recorder.batches) == 2
    study_parts = [batch.split("-")[2] for _, batch in recorder.batches]  # <time>-<tag>-<study>-<chunk>
    for part in study_parts:
        assert len(part) == 16 and part not in unkeyed
    assert study_parts[0] != study_parts[1]  # two associations' batches are not linkable


def test_flow_control_holds_answers_while_the_worker_drains_and_never_while_it_is_stopped(
        tmp_path: Path, dcmtk: dict[str, str]) -> None:
    """Past DICOM__BACKLOG_LIMIT spooled instances, C-STORE answers wait for the worker
    (a real pipeline, run in a thread as a worker process would) to drain the spool; with
    the worker stopped the spool takes everything at once. Nothing is lost either way."""
    files = sorted(write_sample_study(tmp_path / "study", SampleStudySpec(ct_slices=60,
                                                                          mr_slices=0)))
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    index = IndexRepository(engine)
    pipeline = IngestPipeline(FilesystemObjectStore(tmp_path / "objects"), index,
                              DeidentificationPolicy(PseudonymKeys(b"f" * 32), "site1"),
                              tmp_path / "spool", tmp_path / "quarantine")
    batches: queue.Queue[tuple[str, str]] = queue.Queue()
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(),
                        site_id="site1", spool_root=tmp_path / "spool",
                        policy=CallerPolicy.build(["127.0.0.0/8"]), batch_size=5,
                        backlog_limit=10)
    dicom_node = DicomNode(config, lambda site, batch: batches.put((site, batch)))
    registry = dicom_node.metrics.registry

    def held() -> float:
        return registry.get_sample_value("dicom_gateway_dimse_store_held_seconds_total",
                                         {"site": "site1"}) or 0.0

    def send(paths: list[Path]) -> None:
        result = subprocess.run([dcmtk["storescu"], "-v", "-aec", "DICOMGATEWAY", "127.0.0.1",
                                 str(dicom_node.port), *map(str, paths)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-800:]
        assert result.stderr.count("Received Store Response (Success)") == len(paths)

    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                site, batch = batches.get(timeout=0.05)
            except queue.Empty:
                continue
            pipeline.ingest_batch(site, batch)

    dicom_node.start()
    worker = threading.Thread(target=work, daemon=True)
    try:
        send(files[:30])  # the worker is stopped: nothing drains, nothing waits
        assert held() == 0.0
        assert len(_spooled(dicom_node)) == 30
        wait_for(lambda: registry.get_sample_value("dicom_gateway_spool_backlog_instances") == 30,
                 timeout=10, what="the backlog gauge to count the spool")
        worker.start()  # the worker drains 30 instances while 30 more arrive
        send(files[30:])
        assert held() > 0.0
        wait_for(lambda: sum(study.number_of_instances
                             for study in index.search_studies(StudyQuery())) == 60,
                 timeout=120, what="every acknowledged instance to be indexed")
    finally:
        stop.set()
        dicom_node.stop()
        engine.dispose()
    assert _spooled(dicom_node) == []
