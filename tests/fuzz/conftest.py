"""What the DIMSE fuzzers share: a node in this process, and a C-STORE of raw bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node import CallerPolicy, DicomNode, NodeConfig
from tests.support.services import free_port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomNode]:
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path_factory.mktemp("spool"), policy=CallerPolicy.build(["127.0.0.0/8"]))
    running = DicomNode(config, lambda site, batch: None)
    running.start()
    yield running
    running.stop()


def store_bytes_as_they_are(node: DicomNode, path: Path) -> Any:
    """C-STORE the file's data set without pydicom re-encoding it (what a broken or hostile
    sender puts on the wire); the response status data set."""
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    previous = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMGATEWAY")
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = previous
    return status
