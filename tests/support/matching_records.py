"""An index filled with studies whose matching-key values are set here (PS3.18 Table
10.6.1-5 keys at every level), for the QIDO-RS and C-FIND matching tests."""

from __future__ import annotations

from pydicom.dataset import Dataset

from storage import InstanceRecord

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

#: Study UID -> its study-level values (StudyDate, StudyTime, StudyID, ReferringPhysicianName,
#: AccessionNumber, PatientID, PatientName).
STUDIES = {
    "2.25.101": ("20240110", "235958.5", "CT100", "SMITH^JOHN", "ACC1", "PAT1", "DOE^JANE"),
    "2.25.102": ("20240111", "0830", "MR200", "Martin^Claire", "ACC2", "PAT2", "ROE^RICHARD"),
    "2.25.103": ("20240112", "", "", "", "", "PAT3", "POE^EDGAR"),
    "2.25.104": ("20240113", "101010.123456", "CT101", "SMYTHE^JO", "ACC4", "PAT4", "DOE^JOHN"),
}


def _dataset(study: str, series: str, sop: str, sop_class: str, modality: str,
             series_number: int, instance_number: int) -> Dataset:
    date, time, study_id, referring, accession, patient_id, patient_name = STUDIES[study]
    dataset = Dataset()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = study, series, sop
    dataset.SOPClassUID, dataset.Modality = sop_class, modality
    dataset.SeriesNumber, dataset.InstanceNumber = series_number, instance_number
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = date, time, study_id
    dataset.ReferringPhysicianName, dataset.AccessionNumber = referring, accession
    dataset.PatientID, dataset.PatientName = patient_id, patient_name
    return dataset


def matching_records() -> list[InstanceRecord]:
    datasets = []
    for study in STUDIES:
        datasets.append(_dataset(study, f"{study}.1", f"{study}.1.1", CT_IMAGE, "CT", 1, 1))
    first = datasets[0]
    # The first study: a second CT image, the series' procedure step and two requests; an SR.
    first.PerformedProcedureStepStartDate, first.PerformedProcedureStepStartTime = "20240110", "235958"
    first.RequestAttributesSequence = request_attributes(("SPS1", "RP1"), ("SPS2", "RP2"))
    second = _dataset("2.25.101", "2.25.101.1", "2.25.101.1.2", CT_IMAGE, "CT", 1, 2)
    for keyword in ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                    "RequestAttributesSequence"):
        second[keyword] = first[keyword]
    report = _dataset("2.25.101", "2.25.101.2", "2.25.101.2.1", BASIC_TEXT_SR, "SR", 2, 1)
    report.PerformedProcedureStepStartDate, report.PerformedProcedureStepStartTime = "20240111", "0015"
    # The second study's series started at 08:30 on its own day.
    datasets[1].PerformedProcedureStepStartDate = "20240111"
    datasets[1].PerformedProcedureStepStartTime = "083000.25"
    return [InstanceRecord.from_dataset(
        d, object_key=f"studies/{d.SOPInstanceUID}.dcm", size_bytes=1, sha256="0" * 64,
        transfer_syntax_uid="1.2.840.10008.1.2.1", site_id="site1")
        for d in [*datasets, second, report]]


def request_attributes(*steps: tuple[str, str]) -> list[Dataset]:
    """RequestAttributesSequence items: (ScheduledProcedureStepID, RequestedProcedureID)."""
    items = []
    for step, procedure in steps:
        item = Dataset()
        item.ScheduledProcedureStepID, item.RequestedProcedureID = step, procedure
        items.append(item)
    return items
