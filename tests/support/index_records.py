"""Index records of small generated studies, for tests that fill an index directly."""

from __future__ import annotations

from gateway.sample_study import SampleStudySpec, build_sample_study
from storage import InstanceRecord


def study_records(study: str, patient: str, date: str = "20250101", modality: str = "CT",
                  count: int = 1) -> list[InstanceRecord]:
    """`count` instances of one series of study `study` (UIDs derived from it)."""
    records = []
    for dataset in build_sample_study(SampleStudySpec(ct_slices=count, mr_slices=0, ct_size=16)):
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = f"{study}.1"
        dataset.SOPInstanceUID = f"{study}.1.{dataset.InstanceNumber}"
        dataset.PatientID = patient
        dataset.PatientName = f"ANONYMOUS^{patient}"
        dataset.StudyDate = date
        dataset.Modality = modality
        records.append(InstanceRecord.from_dataset(
            dataset, object_key=f"studies/{study}/x/{dataset.InstanceNumber}.dcm",
            size_bytes=100, sha256="0" * 64, transfer_syntax_uid="1.2.840.10008.1.2.1",
            site_id="site1"))
    return records
