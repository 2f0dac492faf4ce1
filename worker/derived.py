"""Objects derived from a stored, de-identified study: the instance a series' thumbnail is
rendered from (`imaging.render` renders it) and the KOS manifest.

Pure functions (no I/O): the pipeline reads the stored instances, calls these once a study
has been quiet for a while, and stores what they return.

* `choose_series_thumbnail_instance` picks the instance of a series to render.
* `build_kos_manifest` builds the IHE XDS-I.b "manifest": a Key Object Selection Document
  (title (113030, DCM, "Manifest")) referencing every instance of the study.

Both the thumbnail and the manifest are deterministic functions of their inputs (the
manifest's UIDs are given by the caller), so regenerating them overwrites, never duplicates.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable, Sequence

import highdicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

from imaging.render import has_pixel_data

__all__ = [
    "FALLBACK_CONTENT_DATETIME",
    "MANIFEST_DOCUMENT_TITLE",
    "MANIFEST_INSTANCE_NUMBER",
    "MANIFEST_SERIES_NUMBER",
    "DerivedObjectError",
    "build_kos_manifest",
    "choose_series_thumbnail_instance",
]

#: Document title of an IHE XDS-I.b imaging manifest (CID 7010).
MANIFEST_DOCUMENT_TITLE = Code("113030", "DCM", "Manifest")
#: Series Number of the manifest series (out of the way of the acquired series).
MANIFEST_SERIES_NUMBER = 9999
#: Instance Number of the (only) manifest instance of that series.
MANIFEST_INSTANCE_NUMBER = 1
#: Content date/time of a manifest whose evidence carries no usable date at all (for
#: example a study de-identified without the "retain longitudinal temporal information"
#: option, where every date is emptied). Content Date/Time are Type 1 in a KOS, and the
#: real current date would reveal the date shift, so a fixed, obviously synthetic value is
#: used instead.
FALLBACK_CONTENT_DATETIME = dt.datetime(1900, 1, 1)

# Attributes highdicom reads from the evidence (`KeyObjectSelectionDocument` copies the
# patient/study ones from the first item; `KeyObjectSelection` looks at Rows/Columns to
# choose an IMAGE or a COMPOSITE content item; `collect_evidence` groups by series).
_EVIDENCE_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
)
# Type 2 in the KOS IOD; highdicom reads them as attributes (AttributeError when absent).
_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
_REQUIRED_EVIDENCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


class DerivedObjectError(ValueError):
    """A derived object (the thumbnail's instance, the manifest) cannot be made from the
    given datasets; a frame that cannot be rendered raises `imaging.RenderError`."""


def _uid_key(uid: object) -> tuple[tuple[int, ...], str]:
    text = str(uid or "")
    parts = text.split(".")
    if all(part.isdigit() for part in parts):
        return tuple(int(part) for part in parts), text
    return (), text


def _instance_number(dataset: Dataset) -> int | None:
    value = dataset.get("InstanceNumber")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _instance_key(dataset: Dataset) -> tuple[int, int, tuple[tuple[int, ...], str]]:
    number = _instance_number(dataset)
    uid = _uid_key(dataset.get("SOPInstanceUID"))
    return (0, number, uid) if number is not None else (1, 0, uid)


def choose_series_thumbnail_instance(datasets: Sequence[Dataset]) -> Dataset:
    """The instance of a series whose thumbnail represents the series.

    Headers are enough: an instance counts as an image when it has a Pixel Data (or Float /
    Double Float Pixel Data) element, even an empty one (DICOM JSON metadata with a
    BulkDataURI); instances without one (SR, KOS, headers read with
    `stop_before_pixels=True`) are ignored. The images are ordered by Instance Number
    (ties, and instances without one, which come last, by SOP Instance UID compared
    component by component) and the middle one (index ``n // 2``) is returned.

    Raises `DerivedObjectError` when no instance has pixel data.
    """
    images = [ds for ds in datasets if has_pixel_data(ds)]
    if not images:
        raise DerivedObjectError("no instance of the series has pixel data")
    images.sort(key=_instance_key)
    return images[len(images) // 2]


# --------------------------------------------------------------------------- manifest


def _parse_datetime(date_value: object, time_value: object) -> dt.datetime | None:
    if not date_value:
        return None
    try:
        date = DA(str(date_value).strip())
    except ValueError:
        return None
    if date is None:
        return None
    time = dt.time()
    if time_value:
        try:
            parsed = TM(str(time_value).strip())
        except ValueError:
            parsed = None
        if parsed is not None:
            time = dt.time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)
    return dt.datetime.combine(dt.date(date.year, date.month, date.day), time)


def _latest_evidence_datetime(evidence: Iterable[Dataset]) -> dt.datetime:
    """The latest Content Date/Time or Study Date/Time of the evidence (see module doc)."""
    moments = [
        moment
        for ds in evidence
        for date_keyword, time_keyword in (
            ("ContentDate", "ContentTime"),
            ("StudyDate", "StudyTime"),
        )
        if (moment := _parse_datetime(ds.get(date_keyword), ds.get(time_keyword))) is not None
    ]
    return max(moments, default=FALLBACK_CONTENT_DATETIME)


def _format_time(moment: dt.datetime) -> str:
    text = moment.strftime("%H%M%S")
    return f"{text}.{moment.microsecond:06d}" if moment.microsecond else text


def _evidence_item(dataset: Dataset) -> Dataset:
    """The attributes highdicom reads from one piece of evidence, without the pixel data."""
    item = Dataset()
    for keyword in (*_EVIDENCE_KEYWORDS, *_PATIENT_STUDY_KEYWORDS):
        if keyword in dataset:
            item.add(copy.deepcopy(dataset[keyword]))
        elif keyword in _PATIENT_STUDY_KEYWORDS:
            setattr(item, keyword, None)  # present and empty, as Type 2 allows
    return item


def _select_instances(
    datasets: Sequence[Dataset], manifest_series_instance_uid: str, manifest_sop_instance_uid: str
) -> list[Dataset]:
    """The instances to reference, checked, without duplicates, in series/instance order."""
    if not datasets:
        raise DerivedObjectError("cannot build a manifest for an empty list of instances")
    by_uid: dict[str, Dataset] = {}
    for position, ds in enumerate(datasets):
        missing = [kw for kw in _REQUIRED_EVIDENCE_KEYWORDS if not ds.get(kw)]
        if missing:
            raise DerivedObjectError(f"instance #{position} lacks {', '.join(missing)}")
        sop_uid = str(ds.SOPInstanceUID)
        if (
            sop_uid == manifest_sop_instance_uid
            or ds.SeriesInstanceUID == manifest_series_instance_uid
        ):
            continue  # an earlier version of this very manifest: never reference it
        previous = by_uid.get(sop_uid)
        if previous is not None:
            if (previous.SOPClassUID, previous.SeriesInstanceUID) != (
                ds.SOPClassUID,
                ds.SeriesInstanceUID,
            ):
                raise DerivedObjectError(
                    f"SOP Instance UID {sop_uid} is given twice with different SOP classes "
                    "or series"
                )
            continue
        by_uid[sop_uid] = ds
    if not by_uid:
        raise DerivedObjectError("no instance to reference besides the manifest itself")
    studies = sorted({str(ds.StudyInstanceUID) for ds in by_uid.values()})
    if len(studies) > 1:
        raise DerivedObjectError(
            f"the instances belong to {len(studies)} studies; a manifest covers exactly one"
        )

    series_numbers: dict[str, int] = {}
    for ds in by_uid.values():
        try:
            number = int(ds.get("SeriesNumber"))
        except (TypeError, ValueError):
            number = 2**31
        series_uid = str(ds.SeriesInstanceUID)
        series_numbers[series_uid] = min(number, series_numbers.get(series_uid, number))

    def order(ds: Dataset) -> tuple[object, ...]:
        series_uid = str(ds.SeriesInstanceUID)
        return (series_numbers[series_uid], _uid_key(series_uid), _instance_key(ds))

    return sorted(by_uid.values(), key=order)


def build_kos_manifest(
    datasets: Sequence[Dataset],
    *,
    manifest_series_instance_uid: str,
    manifest_sop_instance_uid: str,
    retrieve_ae_title: str | None = None,
    retrieve_url: str | None = None,
    manufacturer: str = "dicom-gateway",
) -> Dataset:
    """Build the IHE XDS-I.b manifest of a study: a Key Object Selection Document.

    The document (SOP Class 1.2.840.10008.5.1.4.1.1.88.59, TID 2010 with title
    (113030, DCM, "Manifest")) is made with highdicom's `KeyObjectSelectionDocument` and
    `KeyObjectSelection`. It references every instance in `datasets` (all series, all SOP
    classes; IMAGE content items for instances with Rows/Columns, COMPOSITE otherwise) and
    lists them, grouped by series, in the Current Requested Procedure Evidence Sequence.
    When given, `retrieve_ae_title` (0008,0054) and `retrieve_url` (0008,1190, stored
    verbatim) are set on each Referenced Series Sequence item of that sequence.

    The manifest is series `MANIFEST_SERIES_NUMBER` (9999), instance 1, with the caller's
    (deterministic) series and SOP Instance UIDs, so a regenerated manifest replaces the
    previous one. Instances of the manifest series itself (an earlier version of this
    manifest, passed back with the rest of the stored study) are skipped; an instance given
    twice is referenced once.

    Inputs: only header attributes are read, so datasets read with
    `stop_before_pixels=True` are enough (this is tested). Each needs SOPClassUID,
    SOPInstanceUID, SeriesInstanceUID and StudyInstanceUID; the patient/study attributes
    (PatientName, PatientID, PatientBirthDate, PatientSex, StudyDate, StudyTime,
    AccessionNumber, ReferringPhysicianName, StudyID, and SpecificCharacterSet) are copied
    from the first instance in series/instance order, and are left empty when absent
    (highdicom itself would fail with AttributeError on a missing one). highdicom only sees
    a pixel-free copy of these attributes; the inputs are not modified.

    Dates: the studies are de-identified with shifted dates, so the manifest must not
    carry the real current date, which would reveal the shift: highdicom stamps
    ``datetime.now()`` into Content Date/Time, Instance Creation Date/Time and the
    Contribution DateTime of its Contributing Equipment item ("highdicom", Processing
    Equipment). All of them are set to the latest Content Date/Time or Study Date/Time
    found in the evidence (`FALLBACK_CONTENT_DATETIME` when there is none). This also
    makes the output a pure function of the inputs: the same instances and UIDs give a
    byte-identical manifest, whatever the input order (for a given highdicom version,
    which is written into the file meta and the Contributing Equipment item).

    Raises `DerivedObjectError` for an empty list, instances of more than one study,
    instances lacking the UIDs above, or a UID conflict.
    """
    instances = _select_instances(datasets, manifest_series_instance_uid, manifest_sop_instance_uid)
    if retrieve_ae_title is not None and not 0 < len(retrieve_ae_title.strip()) <= 16:
        raise DerivedObjectError(f"invalid Retrieve AE Title {retrieve_ae_title!r}")
    evidence = [_evidence_item(ds) for ds in instances]
    moment = _latest_evidence_datetime(instances)
    content_date, content_time = moment.strftime("%Y%m%d"), _format_time(moment)

    try:
        content = highdicom.ko.KeyObjectSelection(
            document_title=MANIFEST_DOCUMENT_TITLE,
            referenced_objects=evidence,
        )
        document = highdicom.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=manifest_series_instance_uid,
            series_number=MANIFEST_SERIES_NUMBER,
            sop_instance_uid=manifest_sop_instance_uid,
            instance_number=MANIFEST_INSTANCE_NUMBER,
            manufacturer=manufacturer,
            content_date=content_date,
            content_time=content_time,
        )
    except (ValueError, TypeError) as exc:
        raise DerivedObjectError(f"highdicom refused the manifest: {exc}") from exc
    # highdicom stamps the wall clock into Instance Creation Date/Time and into the
    # Contribution DateTime of its own Contributing Equipment item whatever the arguments:
    # replace both (the wall clock would reveal the date shift and break determinism).
    document.InstanceCreationDate = DA(content_date)
    document.InstanceCreationTime = TM(content_time)
    for equipment in document.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = DT(content_date + content_time)

    for study_item in document.CurrentRequestedProcedureEvidenceSequence:
        for series_item in study_item.ReferencedSeriesSequence:
            if retrieve_ae_title is not None:
                series_item.RetrieveAETitle = retrieve_ae_title.strip()
            if retrieve_url is not None:
                series_item.RetrieveURL = retrieve_url
    return document
