"""A synthetic CT + MR study with realistic pixel data and planted identifying values.

Used by tests and benchmarks (and `dicom-gateway sample-data OUT`): every planted value
must be absent from what the gateway stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's example root, for synthetic data only


@dataclass(frozen=True)
class PlantedIdentity:
    """Identifying values written into the sample study (none may survive de-identification)."""

    patient_name: str = "DUPONT^MARIE^CLAIRE"
    patient_id: str = "IPP-4711-0815"
    issuer_of_patient_id: str = "HOPITAL-SAINT-LOUIS"
    ins: str = "284076322011986"
    ins_issuer: str = "1.2.250.1.213.1.4.10"
    birth_date: str = "19840722"
    accession_number: str = "ACC2026112301"
    address: str = "12 RUE DE LA PAIX PARIS"
    phone: str = "+33145678901"
    institution: str = "HOPITAL SAINT-LOUIS"
    referring_physician: str = "MARTIN^PAUL"
    operator: str = "LEROY^ANNE"
    station: str = "CTSTLOUIS01"
    device_serial: str = "SN-77881234"
    study_date: str = "20261120"

    def strings(self) -> list[str]:
        """Every planted string, as it could appear in bytes of an output file."""
        return [
            self.patient_name,
            self.patient_name.split("^")[0],
            self.patient_id,
            self.ins,
            self.birth_date,
            self.accession_number,
            self.address,
            self.phone,
            self.institution,
            self.referring_physician.split("^")[0],
            self.operator.split("^")[0],
            self.station,
            self.device_serial,
            self.issuer_of_patient_id,
        ]


@dataclass(frozen=True)
class SampleStudySpec:
    ct_slices: int = 24
    mr_slices: int = 12
    ct_size: int = 512
    mr_size: int = 256
    seed: int = 1
    identity: PlantedIdentity = field(default_factory=PlantedIdentity)
    with_ins: bool = True


def _uid(spec: SampleStudySpec, *parts: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(spec.seed), *map(str, parts)])


def _ellipse(
    shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]
) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1.0


def ct_slice_pixels(size: int, index: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A thorax-like CT slice in stored values (HU + 1024): body, lungs, spine, noise."""
    shape = (size, size)
    z = index / max(count - 1, 1)
    hu = np.full(shape, -1000.0)
    body = _ellipse(shape, (size * 0.5, size * 0.5), (size * 0.33, size * 0.45))
    hu[body] = 40.0
    lung_r = (size * (0.18 + 0.04 * np.sin(np.pi * z)), size * 0.14)
    for cx in (size * 0.32, size * 0.68):
        hu[_ellipse(shape, (size * 0.47, cx), lung_r) & body] = -820.0
    hu[_ellipse(shape, (size * 0.72, size * 0.5), (size * 0.05, size * 0.05))] = 700.0
    hu[_ellipse(shape, (size * 0.5, size * 0.5), (size * 0.07, size * 0.06))] = 60.0  # heart
    hu += rng.normal(0.0, 12.0, shape)
    return np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)


def mr_slice_pixels(size: int, index: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A head-like MR slice: skull ring, grey/white matter, ventricles, Rician-ish noise."""
    shape = (size, size)
    z = index / max(count - 1, 1)
    image = np.zeros(shape)
    head = _ellipse(shape, (size / 2, size / 2), (size * 0.42, size * 0.34))
    image[head] = 300.0
    brain = _ellipse(shape, (size / 2, size / 2), (size * 0.37, size * 0.29))
    image[brain] = 900.0
    image[_ellipse(shape, (size / 2, size / 2), (size * 0.25, size * 0.19)) & brain] = 700.0
    vent = (size * (0.06 + 0.04 * np.sin(np.pi * z)), size * 0.03)
    for cx in (size * 0.46, size * 0.54):
        image[_ellipse(shape, (size * 0.48, cx), vent)] = 1800.0
    image = np.abs(image + rng.normal(0.0, 20.0, shape))
    return np.clip(image, 0, 65535).astype(np.uint16)


def _base(spec: SampleStudySpec, sop_class: str, sop_uid: str) -> Dataset:
    who = spec.identity
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(spec, "study")
    ds.PatientName = who.patient_name
    ds.PatientID = who.patient_id
    ds.IssuerOfPatientID = who.issuer_of_patient_id
    if spec.with_ins:
        other = Dataset()
        other.PatientID = who.ins
        other.IssuerOfPatientID = who.ins_issuer
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([other])
    ds.PatientBirthDate = who.birth_date
    ds.PatientSex = "F"
    ds.PatientAge = "042Y"
    ds.PatientAddress = who.address
    ds.PatientTelephoneNumbers = who.phone
    ds.StudyDate = who.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = who.accession_number
    ds.StudyID = "4711"
    ds.StudyDescription = f"EXAM {who.patient_name.split('^')[0]}"
    ds.ReferringPhysicianName = who.referring_physician
    ds.InstitutionName = who.institution
    ds.InstitutionAddress = who.address
    ds.OperatorsName = who.operator
    ds.StationName = who.station
    ds.DeviceSerialNumber = who.device_serial
    ds.Manufacturer = "DICOM-GATEWAY SYNTHETIC"
    ds.FrameOfReferenceUID = _uid(spec, "frame")
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    block = ds.private_block(0x0009, "DICOM-GATEWAY TEST", create=True)
    block.add_new(0x10, "LO", who.patient_name)
    block.add_new(0x11, "LO", who.patient_id)
    return ds


def build_sample_study(spec: SampleStudySpec) -> list[Dataset]:
    """The datasets of the study: one CT series and one MR series."""
    rng = np.random.default_rng(spec.seed)
    datasets: list[Dataset] = []
    series = [
        ("CT", CTImageStorage, spec.ct_slices, spec.ct_size, 1.5, ct_slice_pixels),
        ("MR", MRImageStorage, spec.mr_slices, spec.mr_size, 4.0, mr_slice_pixels),
    ]
    for number, (modality, sop_class, count, size, thickness, pixels) in enumerate(series, 1):
        series_uid = _uid(spec, "series", modality)
        for index in range(count):
            ds = _base(spec, sop_class, _uid(spec, "instance", modality, index))
            ds.Modality = modality
            ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = number
            ds.SeriesDescription = f"{modality} {spec.identity.patient_name.split('^')[0]} SERIES"
            ds.InstanceNumber = index + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ContentDate = spec.identity.study_date
            ds.ContentTime = "101600"
            ds.AcquisitionDate = spec.identity.study_date
            ds.SliceThickness = thickness
            ds.ImagePositionPatient = [-size * 0.35, -size * 0.35, -index * thickness]
            ds.SliceLocation = -index * thickness
            ds.PixelSpacing = [0.7, 0.7] if modality == "CT" else [0.9, 0.9]
            ds.Rows = ds.Columns = size
            ds.BitsStored = 12 if modality == "CT" else 16
            ds.HighBit = ds.BitsStored - 1
            if modality == "CT":
                ds.RescaleIntercept = -1024
                ds.RescaleSlope = 1
                ds.RescaleType = "HU"
                ds.KVP = 120
                ds.WindowCenter, ds.WindowWidth = 40, 400
            else:
                ds.ScanningSequence = "SE"
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = "2D"
                ds.EchoTime = 90
                ds.RepetitionTime = 4000
                ds.MagneticFieldStrength = 1.5
                ds.WindowCenter, ds.WindowWidth = 900, 1800
            ds.PixelData = pixels(size, index, count, rng).tobytes()
            datasets.append(ds)
    return datasets


def write_sample_study(out_dir: Path, spec: SampleStudySpec | None = None) -> list[Path]:
    """Write the study as Part 10 files under `out_dir`; return their paths."""
    spec = spec or SampleStudySpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in build_sample_study(spec):
        path = out_dir / f"{ds.Modality}{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
