"""Hypothesis-mutated data sets sent by C-STORE (bytes flipped, lengths and VRs corrupted,
values cut, bytes inserted): the node answers Success or a named failure status, never
crashes or hangs, and whatever it acknowledged is a parseable instance in the spool."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node import DicomNode
from imaging import StoreStatus
from tests.fuzz.conftest import store_bytes_as_they_are

EXAMPLES = int(os.environ.get("DGW_FUZZ_EXAMPLES", "150"))
ALLOWED = {StoreStatus.SUCCESS, StoreStatus.CANNOT_UNDERSTAND, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
           StoreStatus.OUT_OF_RESOURCES}


def _base() -> bytes:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


BASE = _base()
META_END = 132 + 12 + int.from_bytes(BASE[140:144], "little")  # after the file meta group


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(META_END, len(BASE) - 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(META_END, len(BASE) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(META_END, len(BASE) - 1), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(META_END, len(BASE) - 8), st.integers(0, 2**32 - 1)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    body = bytearray(data)
    for kind, position, value in mutations:
        position = min(position, len(body) - 1)
        if position < META_END:
            continue
        if kind == "flip":
            body[position] = value
        elif kind == "cut":
            del body[position:]
        elif kind == "insert":
            body[position:position] = bytes([value]) * 3
        else:
            body[position:position + 4] = value.to_bytes(4, "little")
    return bytes(body)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          derandomize=not os.environ.get("DGW_FUZZ_RANDOM"), suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_data_sets(node: DicomNode, tmp_path_factory: pytest.TempPathFactory,
                           mutations: list[tuple[str, int, int]]) -> None:
    path = tmp_path_factory.mktemp("case") / "mutated.dcm"
    path.write_bytes(_mutate(BASE, mutations))
    before = set(node.spool.site_dir.glob("*/*.dcm"))
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [pydicom.uid.ExplicitVRLittleEndian])
    previous = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMGATEWAY")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
        except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError):
            return  # pynetdicom itself refused to send this file: nothing reached the node
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = previous
    if "Status" in status:  # no Status: the association was aborted (allowed)
        assert int(status.Status) in ALLOWED, hex(int(status.Status))
        for new in set(node.spool.site_dir.glob("*/*.dcm")) - before:
            pydicom.dcmread(new)  # what was acknowledged parses
            new.unlink()


def test_node_answers_after_the_fuzzing(node: DicomNode) -> None:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMGATEWAY")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


# Regression: found by this fuzzer — pydicom raises struct.error on this corruption; the
# node answered 0xC211 (unhandled exception) and the worker would have retried it forever.
STRUCT_ERROR_CASE = [("cut", 2806, 206), ("insert", 27881, 81)]


def test_struct_error_corruption_is_refused_by_the_node(node: DicomNode,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "struct-error.dcm"
    path.write_bytes(_mutate(BASE, STRUCT_ERROR_CASE))
    assert int(store_bytes_as_they_are(node, path).Status) == StoreStatus.CANNOT_UNDERSTAND


def test_struct_error_corruption_is_quarantined_by_the_worker(tmp_path: Path) -> None:
    from anonymize import DeidentificationPolicy, PseudonymKeys
    from spool import Spool
    from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
    from worker import IngestPipeline

    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    pipeline = IngestPipeline(FilesystemObjectStore(tmp_path / "objects"), IndexRepository(engine),
                              DeidentificationPolicy(PseudonymKeys(b"k" * 32), "site1"),
                              tmp_path / "spool", tmp_path / "quarantine")
    Spool(tmp_path / "spool", "site1").write("batch-1", "1.2.3.4", _mutate(BASE, STRUCT_ERROR_CASE))
    report = pipeline.ingest_batch("site1", "batch-1")
    assert report.quarantined == 1 and report.stored == 0
    assert list((tmp_path / "quarantine" / "site1" / "batch-1").glob("*.reason.json"))
