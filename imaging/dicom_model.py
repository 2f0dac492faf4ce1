"""The one formatter of DICOM data for clients: the DICOM JSON Model (PS3.18 Annex F) of a
data set (`dataset_document`, `instance_document`) or of index values (`index_document`),
as bytes any strict parser reads (`json_bytes`), and the Native DICOM Model XML (PS3.19
Annex A) of a JSON document (`native_xml`)."""

from __future__ import annotations

import json
import re

# Only builds XML from our own DICOM JSON; never parses untrusted XML.
import xml.etree.ElementTree as ET  # nosec B405
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
#: What XML 1.0 cannot carry (§2.2 Char): C0 controls but tab, LF and CR, lone surrogates,
#: U+FFFE and U+FFFF. ElementTree writes them as they are: a document no parser reads.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


#: Binary values from this many bytes on are BulkDataURIs, not InlineBinary.
BULK_DATA_THRESHOLD = 1024


def dataset_document(
    dataset: Dataset,
    bulk_uri: Callable[[DataElement], str] | None = None,
    threshold: int = BULK_DATA_THRESHOLD,
) -> dict[str, Any]:
    """`dataset` as a DICOM JSON object: binary values of `threshold` bytes or more named by
    `bulk_uri` (BulkDataURI), inline without it."""
    if bulk_uri is None:
        document: dict[str, Any] = dataset.to_json_dict()
    else:
        document = dataset.to_json_dict(
            bulk_data_threshold=threshold, bulk_data_element_handler=bulk_uri
        )
    return document


def instance_document(dataset: Dataset, study: str, series: str, sop: str) -> dict[str, Any]:
    """A stored instance's DICOM JSON (WADO-RS metadata): bulk data replaced by BulkDataURIs
    relative to the DICOMweb root (`studies/…/instances/…/bulkdata/<tag>`), which the API
    makes absolute when it answers."""
    base = f"studies/{study}/series/{series}/instances/{sop}/bulkdata"
    return dataset_document(dataset, lambda element: f"{base}/{int(element.tag):08X}")


@lru_cache(maxsize=256)
def _tag_and_vr(keyword: str) -> tuple[str, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}", dictionary_VR(tag)


def index_document(elements: Iterable[tuple[str, object]]) -> dict[str, object]:
    """DICOM JSON (PS3.18 F.2) of index values, the way pydicom's `to_json_dict` writes them,
    without building a Dataset per result (that cost a QIDO-RS answer 0.2 ms per match).
    Empty values have no "Value"; PN is split into its component groups; multi-valued
    strings are lists; IS/US are numbers."""
    result: dict[str, object] = {}
    for keyword, value in elements:
        tag, vr = _tag_and_vr(keyword)
        element: dict[str, object] = {"vr": vr}
        if value is None or value == "" or value == ():
            pass
        elif vr == "PN":
            pairs = list(
                zip(("Alphabetic", "Ideographic", "Phonetic"), str(value).split("="), strict=False)
            )
            while pairs and not pairs[-1][1]:
                pairs.pop()  # trailing empty groups are left out, leading ones kept
            element["Value"] = [dict(pairs)]
        elif vr in {"IS", "US", "UL", "SS", "SL"}:
            element["Value"] = [int(value)]  # type: ignore[call-overload]
        elif isinstance(value, (list, tuple)):
            element["Value"] = list(value)
        else:
            element["Value"] = str(value).split("\\")
        result[tag] = element
    return dict(sorted(result.items()))


#: A UTF-16 surrogate alone (from a value decoded with surrogateescape): not UTF-8 text.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_bytes(body: Any) -> bytes:
    """`body` as UTF-8 JSON that any strict parser reads: a lone surrogate, which UTF-8
    cannot carry, becomes U+FFFD."""
    text = json.dumps(body, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode()


def xml_text(value: object) -> str:
    """`value` as text XML 1.0 can carry: each character it cannot, U+FFFD."""
    return _NOT_XML.sub("\ufffd", str(value))


def _person_name(parent: ET.Element, number: int, value: dict[str, str]) -> None:
    name = ET.SubElement(parent, "PersonName", number=str(number))
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = value.get(group)
        if not text:
            continue
        element = ET.SubElement(name, group)
        for part, component in zip(_NAME_PARTS, text.split("^"), strict=False):
            if component:
                ET.SubElement(element, part).text = xml_text(component)


def _attribute(parent: ET.Element, tag: str, attribute: dict[str, Any]) -> None:
    vr = xml_text(attribute.get("vr", "UN"))
    keyword = keyword_for_tag(int(tag, 16)) or ""
    fields = {"tag": xml_text(tag), "vr": vr}
    if keyword:
        fields["keyword"] = keyword
    element = ET.SubElement(parent, "DicomAttribute", fields)
    if "BulkDataURI" in attribute:
        ET.SubElement(element, "BulkData", uri=xml_text(attribute["BulkDataURI"]))
        return
    if "InlineBinary" in attribute:
        ET.SubElement(element, "InlineBinary").text = xml_text(attribute["InlineBinary"])
        return
    for number, value in enumerate(attribute.get("Value", []), start=1):
        if vr == "SQ":
            item = ET.SubElement(element, "Item", number=str(number))
            _dataset(item, value)
        elif vr == "PN" and isinstance(value, dict):
            _person_name(element, number, value)
        else:
            ET.SubElement(element, "Value", number=str(number)).text = (
                "" if value is None else xml_text(value)
            )


def _dataset(parent: ET.Element, document: dict[str, Any]) -> None:
    for tag in sorted(document):
        _attribute(parent, tag, document[tag])


def native_xml(document: dict[str, Any]) -> bytes:
    """One data set as a NativeDicomModel document (UTF-8, with declaration)."""
    root = ET.Element("NativeDicomModel", xmlns=NAMESPACE)
    _dataset(root, document)
    encoded: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return encoded


__all__ = [
    "BULK_DATA_THRESHOLD",
    "dataset_document",
    "index_document",
    "instance_document",
    "json_bytes",
    "native_xml",
    "xml_text",
]
