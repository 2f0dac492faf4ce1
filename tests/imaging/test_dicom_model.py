"""The one DICOM JSON/XML formatter (imaging.dicom_model): pydicom writes the JSON model,
ours names bulk data the way WADO-RS serves it, keeps JSON parseable, and writes XML that a
strict parser reads back to the same values."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from pydicom.dataset import Dataset

from imaging.dicom_model import (
    BULK_DATA_THRESHOLD,
    dataset_document,
    instance_document,
    json_bytes,
    native_xml,
)

NS = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}


def _dataset() -> Dataset:
    dataset = Dataset()
    dataset.PatientName = "DUPONT^Marie^^Dr"
    dataset.Rows = 2
    dataset.ICCProfile = b"\x01" * BULK_DATA_THRESHOLD  # at the threshold: bulk data
    dataset.add_new(0x00091010, "OB", b"\x02" * 8)  # small: inline
    return dataset


def test_instance_bulk_data_are_uris_under_the_instance_and_small_values_inline() -> None:
    document = instance_document(_dataset(), "2.25.1", "2.25.2", "2.25.3")
    assert document["00282000"] == {
        "vr": "OB",
        "BulkDataURI": "studies/2.25.1/series/2.25.2/instances/2.25.3/bulkdata/00282000",
    }
    assert "InlineBinary" in document["00091010"]
    assert document["00280010"] == {"vr": "US", "Value": [2]}
    assert document == json.loads(json_bytes(document))


def test_without_a_uri_handler_every_binary_value_is_inline() -> None:
    document = dataset_document(_dataset())
    assert "InlineBinary" in document["00282000"] and "BulkDataURI" not in document["00282000"]


def test_json_bytes_replace_a_lone_surrogate_that_utf8_cannot_carry() -> None:
    body = [{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A\udcffB"}]}}]
    encoded = json_bytes(body)
    assert json.loads(encoded.decode("utf-8", errors="strict"))[0]["00100010"]["Value"] == [
        {"Alphabetic": "A\ufffdB"}
    ]


def test_native_xml_carries_names_values_and_bulk_data() -> None:
    document = instance_document(_dataset(), "2.25.1", "2.25.2", "2.25.3")
    root = ET.fromstring(native_xml(document))
    name = root.find("d:DicomAttribute[@tag='00100010']/d:PersonName/d:Alphabetic", NS)
    assert name is not None
    assert name.findtext("d:FamilyName", namespaces=NS) == "DUPONT"
    assert name.findtext("d:NamePrefix", namespaces=NS) == "Dr"
    assert root.findtext("d:DicomAttribute[@tag='00280010']/d:Value", namespaces=NS) == "2"
    bulk = root.find("d:DicomAttribute[@tag='00282000']/d:BulkData", NS)
    assert bulk is not None and bulk.get("uri", "").endswith("/bulkdata/00282000")
