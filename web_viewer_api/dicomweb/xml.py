"""DICOM JSON (PS3.18 Annex F) to the Native DICOM Model XML (PS3.19 Annex A)."""

from __future__ import annotations

import re

# Only builds XML from our own DICOM JSON; never parses untrusted XML.
import xml.etree.ElementTree as ET  # nosec B405
from typing import Any

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
#: What XML 1.0 cannot carry (§2.2 Char): C0 controls but tab, LF and CR, lone surrogates,
#: U+FFFE and U+FFFF. ElementTree writes them as they are: a document no parser reads.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


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


def to_native_xml(document: dict[str, Any]) -> bytes:
    """One data set as a NativeDicomModel document (UTF-8, with declaration)."""
    root = ET.Element("NativeDicomModel", xmlns=NAMESPACE)
    _dataset(root, document)
    encoded: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return encoded
