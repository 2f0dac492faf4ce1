"""Objects a viewer, an AI tool or a PACS sends back into a stored study, built from stored
(de-identified) instances as those tools build them: a Basic Text SR written like a viewer's
report (pydicom), a TID 1500 measurement report and a segmentation (highdicom)."""

from __future__ import annotations

import datetime as dt
from io import BytesIO

import highdicom as hd
import httpx
import numpy as np
import pydicom
from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    FindingSite,
    ImageRegion3D,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
#: Copied from the evidence, as viewers copy the Patient and General Study modules.
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                      "PatientIdentityRemoved", "StudyInstanceUID", "StudyDate", "StudyTime",
                      "AccessionNumber", "StudyID", "ReferringPhysicianName")


def to_bytes(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def stow(url: str, headers: dict[str, str], datasets: list[Dataset]) -> httpx.Response:
    """STOW-RS of `datasets` to `url` (a study's or the root's), as one multipart request."""
    boundary = "dicom-gateway-test"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + to_bytes(d) + b"\r\n" for d in datasets) + f"--{boundary}--\r\n".encode()
    return httpx.post(url, content=body, timeout=120, headers={
        **headers, "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def basic_text_sr(evidence: list[Dataset], text: str, *, author: str = "") -> Dataset:
    """A Basic Text SR report on `evidence` (stored instances of one study): its own new
    series and instance UIDs, dated now, referencing every evidence instance."""
    report = Dataset()
    for keyword in _PATIENT_AND_STUDY:
        if keyword in evidence[0]:
            setattr(report, keyword, evidence[0].data_element(keyword).value)
    now = dt.datetime.now()
    report.SOPClassUID = BASIC_TEXT_SR
    report.SOPInstanceUID = generate_uid()
    report.SeriesInstanceUID = generate_uid()
    report.Modality = "SR"
    report.SeriesNumber = 900
    report.InstanceNumber = 1
    report.Manufacturer = "Viewer"
    report.ContentDate, report.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    report.SeriesDate = report.ContentDate
    report.CompletionFlag, report.VerificationFlag = "COMPLETE", "UNVERIFIED"
    report.ValueType = "CONTAINER"
    report.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    report.ConceptNameCodeSequence = Sequence([title])
    if author:
        report.OperatorsName = author
    finding = Dataset()
    finding.RelationshipType, finding.ValueType, finding.TextValue = "CONTAINS", "TEXT", text
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    finding.ConceptNameCodeSequence = Sequence([concept])
    report.ContentSequence = Sequence([finding])
    series: dict[str, list[Dataset]] = {}
    for instance in evidence:
        series.setdefault(str(instance.SeriesInstanceUID), []).append(instance)
    study_item = Dataset()
    study_item.StudyInstanceUID = evidence[0].StudyInstanceUID
    study_item.ReferencedSeriesSequence = Sequence()
    for series_uid, instances in series.items():
        series_item = Dataset()
        series_item.SeriesInstanceUID = series_uid
        series_item.ReferencedSOPSequence = Sequence()
        for instance in instances:
            reference = Dataset()
            reference.ReferencedSOPClassUID = instance.SOPClassUID
            reference.ReferencedSOPInstanceUID = instance.SOPInstanceUID
            series_item.ReferencedSOPSequence.append(reference)
        study_item.ReferencedSeriesSequence.append(series_item)
    report.CurrentRequestedProcedureEvidenceSequence = Sequence([study_item])
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    return report


def encapsulated_pdf(evidence: Dataset, pdf: bytes, title: str) -> Dataset:
    """An Encapsulated PDF (a scanned request, an outside report) for the study of a stored
    instance `evidence`, in its own new series."""
    document = Dataset()
    for keyword in _PATIENT_AND_STUDY:
        if keyword in evidence:
            setattr(document, keyword, evidence.data_element(keyword).value)
    document.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    document.SOPInstanceUID, document.SeriesInstanceUID = generate_uid(), generate_uid()
    document.Modality, document.SeriesNumber, document.InstanceNumber = "DOC", 950, 1
    document.Manufacturer = "Scanner"
    document.ContentDate, document.ContentTime = evidence.get("StudyDate", ""), "120000"
    document.BurnedInAnnotation = "YES"
    document.DocumentTitle = title
    document.ConceptNameCodeSequence = Sequence()
    document.MIMETypeOfEncapsulatedDocument = "application/pdf"
    document.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    document.EncapsulatedDocumentLength = len(pdf)
    document.file_meta = FileMetaDataset()
    document.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    document.file_meta.MediaStorageSOPClassUID = document.SOPClassUID
    document.file_meta.MediaStorageSOPInstanceUID = document.SOPInstanceUID
    return document


def segmentation(source_images: list[Dataset]) -> Dataset:
    """A binary segmentation of `source_images` (one series), as an AI tool writes it."""
    mask = np.zeros((len(source_images), source_images[0].Rows, source_images[0].Columns),
                    dtype=bool)
    mask[:, 4:12, 4:12] = True
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test-ai", version="1.0", family=codes.cid7162.ArtificialIntelligence))
    result = hd.seg.Segmentation(
        source_images=source_images, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="AI vendor",
        manufacturer_model_name="test-ai", software_versions="1.0", device_serial_number="1")
    return pydicom.dcmread(BytesIO(to_bytes(result)))


def measurement_report(image: Dataset) -> Dataset:
    """A TID 1500 measurement report (OHIF's kind of SR) with one area on `image`."""
    region = ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                           graphic_data=np.array([[1.0, 1.0, 0.0], [5.0, 1.0, 0.0],
                                                  [5.0, 5.0, 0.0], [1.0, 1.0, 0.0]]),
                           frame_of_reference_uid=image.FrameOfReferenceUID)
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="ROI 1"),
        referenced_region=region,
        finding_type=codes.SCT.Neoplasm,
        finding_sites=[FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=[Measurement(name=codes.SCT.Area, value=16.0, unit=codes.UCUM.SquareMillimeter)])
    observer = ObserverContext(observer_type=codes.DCM.Person,
                               observer_identifying_attributes=PersonObserverIdentifyingAttributes(
                                   name="Reader^Test"))
    content = MeasurementReport(observation_context=ObservationContext(observer_person_context=observer),
                                procedure_reported=CodedConcept("77477000", "SCT", "CT"),
                                imaging_measurements=[group])
    report = Comprehensive3DSR(evidence=[image], content=content, series_number=902,
                               series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
                               instance_number=1, manufacturer="Viewer")
    return pydicom.dcmread(BytesIO(to_bytes(report)))


__all__ = ["BASIC_TEXT_SR", "basic_text_sr", "measurement_report", "segmentation", "to_bytes"]


def presentation_state(images: list[Dataset], *, center: float, width: float,
                       rotation: int = 0, flip: bool = False) -> Dataset:
    """A Grayscale Softcopy Presentation State on `images` (one series), as a PACS
    workstation saves one: a window, a polyline and a text on the first image (pixel
    units: the polyline from (4, 4) to (28, 4) to (28, 28)), optionally rotated and
    flipped."""
    layer = hd.pr.GraphicLayer(layer_name="FINDINGS", order=1)
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=images[:1], graphic_layer=layer,
        graphic_objects=[hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[4.0, 4.0], [28.0, 4.0], [28.0, 28.0]]),
            units=hd.pr.AnnotationUnitsValues.PIXEL)],
        text_objects=[hd.pr.TextObject(text_value="NODULE", units=hd.pr.AnnotationUnitsValues.PIXEL,
                                       anchor_point=(28.0, 28.0))])
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images, series_instance_uid=hd.UID(), series_number=950,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="PACS vendor",
        manufacturer_model_name="workstation", software_versions="1.0", device_serial_number="1",
        content_label="KEY_VIEW", graphic_annotations=[annotation], graphic_layers=[layer],
        voi_lut_transformations=[hd.pr.SoftcopyVOILUTTransformation(
            window_center=center, window_width=width)])
    dataset = pydicom.dcmread(BytesIO(to_bytes(state)))
    if rotation or flip:  # Spatial Transformation module (highdicom leaves it out)
        dataset.ImageRotation = rotation
        dataset.ImageHorizontalFlip = "Y" if flip else "N"
    return dataset
