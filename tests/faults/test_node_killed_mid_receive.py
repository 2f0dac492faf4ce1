"""A node killed (SIGKILL) while a data set streams in leaves no identified residue where
nobody looks: the partial file is in the site's spool folder (0700, file 0600), never in
$TMPDIR, and the next node that starts removes it, then receives as before."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.services import GatewayProcess, free_port, gateway_command, gateway_env, wait_for


def _large_ct(marker: str) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientName, dataset.PatientID, dataset.Modality = marker, "ID-" + marker, "CT"
    dataset.Rows = dataset.Columns = 2048
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.PixelData = np.random.default_rng(7).integers(0, 4096, (2048, 2048), np.uint16).tobytes()
    return dataset


class _SlowLink:
    """Forwards one connection to the node, the sender's bytes at about 1 MB/s: the data
    set is still arriving when the node is killed."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        node = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(node, client, 0.0), daemon=True).start()
        self._pump(client, node, 0.06)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, pause: float) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                time.sleep(pause)
        except OSError:
            pass
        for end in (source, sink):
            end.close()


def _node(data_dir: Path, port: int) -> list[str]:
    return gateway_command("node", "--data-dir", str(data_dir), "--dicom-port", str(port))


def test_killed_mid_receive_leaves_nothing_in_tmpdir_and_a_restart_removes_the_partial_file(
        tmp_path: Path) -> None:
    data_dir, tmpdir = tmp_path / "data", tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**gateway_env(data_dir), "TMPDIR": str(tmpdir)}
    port = free_port()
    ready = data_dir / "run" / "node.ready"
    with GatewayProcess(_node(data_dir, port), env, tmp_path / "node.log") as node:
        wait_for(lambda: ready.exists() or not node.alive(), timeout=60, what="the node")
        assert node.alive(), node.log_text()
        link = _SlowLink(port)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        sender = threading.Thread(target=lambda: _send(ae, link.port, _large_ct("RESIDUE^MARKER")),
                                  daemon=True)
        sender.start()
        folder = data_dir / "spool" / ".receiving" / f"node-{node.process.pid}"  # type: ignore[union-attr]

        def partial() -> list[Path]:
            return [p for p in folder.glob("*") if p.stat().st_size > 1 << 20]

        [leftover] = wait_for(partial, timeout=60, what="a data set half received")
        os.kill(node.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        node.process.wait(timeout=10)  # type: ignore[union-attr]
    assert leftover.exists() and b"RESIDUE^MARKER" in leftover.read_bytes()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(leftover.stat().st_mode) == 0o600
    assert list(tmpdir.iterdir()) == []  # nothing identified where nobody looks
    with GatewayProcess(_node(data_dir, port), env, tmp_path / "again.log") as again:
        # The killed node's readiness file is still there: wait for this one's own.
        wait_for(lambda: _ready_pid(ready) == again.process.pid or not again.alive(),  # type: ignore[union-attr]
                 timeout=60, what="the node again")
        assert not folder.exists()  # what the killed node left is gone
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assert _send(ae, port, _large_ct("SECOND^TRY")) == 0x0000
    assert list(tmpdir.iterdir()) == []


def _ready_pid(ready: Path) -> int | None:
    try:
        return int(ready.read_text())
    except (OSError, ValueError):
        return None


def _send(ae: AE, port: int, dataset: Dataset) -> int:
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATEWAY")
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status) if "Status" in status else -1
    finally:
        if assoc.is_established:
            assoc.release()
