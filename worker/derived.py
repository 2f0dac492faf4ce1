"""Objects derived from a stored, de-identified study: thumbnails and the KOS manifest.

Pure functions (no I/O): the pipeline reads the stored instances, calls these once a study
has been quiet for a while, and stores what they return.

* `render_frame` renders one frame of an image, fitted to a size; `render_thumbnail` as a
  small PNG.
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
from io import BytesIO
from typing import Any

import highdicom
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

__all__ = [
    "FALLBACK_CONTENT_DATETIME",
    "MANIFEST_DOCUMENT_TITLE",
    "MANIFEST_INSTANCE_NUMBER",
    "MANIFEST_SERIES_NUMBER",
    "DerivedObjectError",
    "build_kos_manifest",
    "choose_series_thumbnail_instance",
    "render_frame",
    "render_thumbnail",
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

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
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
    """A derived object (thumbnail, manifest) cannot be made from the given datasets."""


# --------------------------------------------------------------------------- thumbnails


def _has_pixel_data(dataset: Dataset) -> bool:
    """Whether a pixel data element is present, even without a value (a BulkDataURI)."""
    return any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS)


def _has_pixel_values(dataset: Dataset) -> bool:
    return any(
        keyword in dataset and dataset[keyword].value is not None and len(dataset[keyword].value)
        for keyword in _PIXEL_DATA_KEYWORDS
    )


def _number_of_frames(dataset: Dataset) -> int:
    try:
        return max(int(dataset.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _frame_view(dataset: Dataset, index: int) -> Dataset:
    """A private copy of the Image Pixel / Modality LUT / VOI LUT attributes of one frame.

    pydicom's LUT helpers only look at top-level attributes and (harmlessly) reassign some
    of them, so they get a deep copy of group 0028 rather than the caller's dataset. For
    enhanced multi-frame images the Pixel Value Transformation and Frame VOI LUT macros of
    the shared and per-frame functional groups are flattened into it.
    """
    view = copy.deepcopy(dataset.group_dataset(0x0028))
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None:
        view.file_meta = copy.deepcopy(file_meta)
    view.set_original_encoding(*dataset.original_encoding)
    if "PhotometricInterpretation" in view:
        view.PhotometricInterpretation = str(view.PhotometricInterpretation).strip().upper()
    groups: list[Dataset] = []
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            items = group.get(macro)
            if items:
                for element in items[0]:
                    view.add(copy.deepcopy(element))
    return view


def _to_uint8(values: npt.NDArray[np.float64], low: float, high: float) -> npt.NDArray[np.uint8]:
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _min_max_uint8(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:  # uniform frame: mid grey rather than an arbitrary extreme
        return np.full(values.shape, 128, dtype=np.uint8)
    return _to_uint8(np.nan_to_num(values, nan=low, posinf=high, neginf=low), low, high)


def _greyscale(frame: npt.NDArray[np.generic], view: Dataset) -> npt.NDArray[np.uint8]:
    """Modality LUT, then the first window (else a VOI LUT, else min-max) -> 8 bits."""
    values = np.asarray(apply_modality_lut(frame, view), dtype=np.float64)
    out: npt.NDArray[np.uint8] | None = None
    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
        try:
            windowed = apply_voi_lut(values, view, index=0, prefer_lut=False)
            # The windowing output range (PS3.3 C.11.2.1.2) depends on Bits Stored, Pixel
            # Representation and the rescale: let pydicom map two extreme inputs onto it.
            with np.errstate(over="ignore", invalid="ignore"):
                bounds = apply_voi_lut(
                    np.array([-1e300, 1e300]), view, index=0, prefer_lut=False
                )
            out = _to_uint8(np.asarray(windowed, np.float64), float(bounds[0]), float(bounds[1]))
        except (ValueError, IndexError, TypeError):
            out = None  # unusable window (e.g. width < 1): fall back to min-max
    elif view.get("VOILUTSequence"):
        try:
            looked_up = apply_voi_lut(values, view, index=0)
            depth = int(view.VOILUTSequence[0].LUTDescriptor[2])
            out = _to_uint8(np.asarray(looked_up, np.float64), 0.0, float(2**depth - 1))
        except (ValueError, IndexError, TypeError, NotImplementedError, AttributeError):
            out = None
    if out is None:
        out = _min_max_uint8(values)
    if view.get("PhotometricInterpretation") == "MONOCHROME1":
        out = np.subtract(255, out, dtype=np.uint8)
    return out


def _colour(frame: npt.NDArray[np.generic], view: Dataset) -> npt.NDArray[np.uint8]:
    """RGB (pydicom already converted YBR to RGB) or a palette lookup -> 8 bits a sample."""
    if view.get("PhotometricInterpretation") == "PALETTE COLOR":
        rgb = apply_color_lut(frame, view)
        depth = 16 if rgb.dtype.itemsize > 1 else 8
    else:
        rgb = frame
        depth = int(view.get("BitsStored") or 8 * rgb.dtype.itemsize)
    if np.issubdtype(rgb.dtype, np.floating):
        return _min_max_uint8(np.asarray(rgb, np.float64))
    if depth <= 8:
        return np.asarray(rgb).astype(np.uint8)
    return _to_uint8(np.asarray(rgb, np.float64), 0.0, float(2**depth - 1))


def _reduce_early(frame: npt.NDArray[Any], size: int, *, palette: bool) -> npt.NDArray[Any]:
    """The decoded frame shrunk by a whole factor to about twice `size` (at least), before
    the float64 LUT arithmetic: a large frame costs its decoded size once, not eight times.
    Block means (rounded to the stored type, so the LUTs still index with them); palette
    indices are sampled instead, a mean of two indices being no colour of either."""
    factor = max(frame.shape[0], frame.shape[1]) // (2 * size)
    if factor < 2:
        return frame
    if palette:
        return np.ascontiguousarray(frame[::factor, ::factor])
    rows, columns = frame.shape[0] // factor, frame.shape[1] // factor
    blocks = frame[: rows * factor, : columns * factor].reshape(
        rows, factor, columns, factor, *frame.shape[2:])
    means: npt.NDArray[np.float64] = np.asarray(blocks.mean(axis=(1, 3), dtype=np.float64))
    if np.issubdtype(frame.dtype, np.integer):
        means = np.rint(means)
    return means.astype(frame.dtype)


def render_frame(dataset: Dataset, size: int = 128, frame_index: int | None = None) -> Image.Image:
    """One frame of `dataset` as an 8-bit greyscale or RGB image fitted into `size` x `size`.

    Only that frame is decoded (`pixel_array(..., index=)`): the other frames of a
    multi-frame image are never decompressed. The middle frame is used when `frame_index`
    is None. Greyscale images get the Modality LUT (Rescale Slope/Intercept or Modality LUT
    Sequence), then the first Window Center/Width (with the dataset's VOI LUT Function,
    linear by default), else a VOI LUT Sequence, else the min-max range of the frame;
    MONOCHROME1 is inverted so that the image always shows low values dark. RGB and YBR
    images (converted to RGB by pydicom's decoders) are kept in colour, PALETTE COLOR goes
    through the palette. The image is only ever shrunk (with its aspect ratio in pixels
    kept), never enlarged; a frame much larger than `size` is first reduced by block means,
    so the LUT arithmetic runs on a small copy. Compressed transfer syntaxes work as far as
    pydicom's installed decoding plugins go.

    Raises `DerivedObjectError` for a dataset without pixel data (e.g. read with
    `stop_before_pixels=True`, made from DICOM JSON with a BulkDataURI, or an SR), for a
    frame that does not exist and for pixel data that cannot be decoded.
    """
    if size < 1:
        raise ValueError(f"thumbnail size must be at least 1, not {size}")
    if not _has_pixel_values(dataset):
        raise DerivedObjectError(
            "cannot render a thumbnail: the dataset has no pixel data "
            f"(SOP Class {dataset.get('SOPClassUID', 'unknown')})"
        )
    frames = _number_of_frames(dataset)
    index = frames // 2 if frame_index is None else frame_index
    if not 0 <= index < frames:
        raise DerivedObjectError(f"frame {index + 1} does not exist ({frames} frames)")
    try:
        view = _frame_view(dataset, index)
        palette = view.get("PhotometricInterpretation") == "PALETTE COLOR"
        frame = _reduce_early(pixel_array(dataset, index=index), size, palette=palette)
        samples = int(view.get("SamplesPerPixel") or 1)
        if samples == 1 and not palette:
            pixels = _greyscale(frame, view)
            image = Image.fromarray(pixels, mode="L")
        else:
            pixels = _colour(frame, view)
            if pixels.ndim != 3 or pixels.shape[-1] < 3:
                raise DerivedObjectError(f"unexpected colour pixel array shape {pixels.shape}")
            image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]), mode="RGB")
    except DerivedObjectError:
        raise
    except Exception as exc:  # decoder plugins raise many types: report one
        raise DerivedObjectError(f"cannot render a thumbnail: {exc}") from exc
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def render_thumbnail(dataset: Dataset, size: int = 128, frame_index: int | None = None) -> bytes:
    """`render_frame` as a PNG (the middle frame of a multi-frame image by default).

    Raises `DerivedObjectError` as `render_frame` does.
    """
    out = BytesIO()
    render_frame(dataset, size, frame_index).save(out, format="PNG", optimize=False)
    return out.getvalue()


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
    images = [ds for ds in datasets if _has_pixel_data(ds)]
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
        for date_keyword, time_keyword in (("ContentDate", "ContentTime"), ("StudyDate", "StudyTime"))
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
        if sop_uid == manifest_sop_instance_uid or ds.SeriesInstanceUID == manifest_series_instance_uid:
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
    instances = _select_instances(
        datasets, manifest_series_instance_uid, manifest_sop_instance_uid
    )
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
