"""Library warnings and log records at a site never print a value: pydicom quotes invalid
values it reads (original UIDs, dates) before de-identification; pynetdicom dumps data sets."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.library_logs import withhold_library_values
from gateway.sample_study import SampleStudySpec, write_sample_study
from spool import Spool
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from worker import IngestPipeline

UID_MARKER = "1.2.999.424242"
DATE_MARKER = "PLANTED-SECRET"


def planted_instance(folder: Path) -> Path:
    """A CT instance with an invalid UI value and an invalid DA value, both planted."""
    [source] = write_sample_study(folder / "source", SampleStudySpec(ct_slices=1, mr_slices=0,
                                                                     ct_size=16))
    dataset = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns (with the values) while we plant them
        dataset.FrameOfReferenceUID = f"{UID_MARKER}.X"
        dataset.StudyDate = DATE_MARKER
        dataset.save_as(folder / "planted.dcm", enforce_file_format=True)
    return folder / "planted.dcm"


@pytest.fixture
def withheld() -> Iterator[None]:
    """The site processes' logging set-up, undone afterwards (it is process-wide)."""
    factory = logging.getLogRecordFactory()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # An earlier test's in-process set-up leaves logging believing it captures warnings
        # while pytest has since restored warnings.showwarning: start from a clean state.
        logging.captureWarnings(False)
        withhold_library_values()
        try:
            yield
        finally:
            logging.captureWarnings(False)
            logging.setLogRecordFactory(factory)


def test_ingest_of_invalid_values_logs_no_value_even_at_debug(
        tmp_path: Path, withheld: None, caplog: pytest.LogCaptureFixture) -> None:
    planted = planted_instance(tmp_path)
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    pipeline = IngestPipeline(FilesystemObjectStore(tmp_path / "objects"), IndexRepository(engine),
                              DeidentificationPolicy(PseudonymKeys(b"k" * 32), "site1"),
                              tmp_path / "spool", tmp_path / "quarantine")
    Spool(tmp_path / "spool", "site1").write(
        "b1", str(pydicom.dcmread(planted, stop_before_pixels=True).SOPInstanceUID),
        planted.read_bytes())
    caplog.set_level(logging.DEBUG)
    report = pipeline.ingest_batch("site1", "b1")
    assert report.stored + report.quarantined == 1
    assert UID_MARKER not in caplog.text and DATE_MARKER not in caplog.text
    by_logger = {record.name: record.getMessage() for record in caplog.records}
    # the library did speak: its records and its warnings are there, without their text
    assert "text withheld" in by_logger["pydicom"]
    assert by_logger["py.warnings"].startswith("UserWarning raised at pydicom/valuerep.py:")


def test_pynetdicom_records_and_tracebacks_keep_no_text(
        withheld: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # The site keeps pynetdicom at INFO (an earlier in-process set-up may have done so):
    # here its DEBUG dumps are let through, to show they carry no value either.
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    logging.getLogger("pynetdicom.dsutils").debug("(0010,0010) PN [DOE^%s]", DATE_MARKER)
    try:
        raise ValueError(f"Invalid value for VR UI: '{UID_MARKER}'")
    except ValueError:
        logging.getLogger("pynetdicom.service_class").exception("handler failed on %s", UID_MARKER)
    logging.getLogger("dicom_node.handlers").info("our own record stays as written")
    assert UID_MARKER not in caplog.text and DATE_MARKER not in caplog.text
    messages = [record.getMessage() for record in caplog.records]
    assert messages[1] == ("pynetdicom.service_class error (text withheld: it may quote data "
                           "element values); ValueError")
    assert messages[2] == "our own record stays as written"
