"""The QIDO-RS result encoder writes exactly what pydicom's own DICOM JSON encoder writes
for the same values (pydicom is the oracle; ours skips building a Dataset per match)."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.dataset import Dataset

from storage import InstanceSummary, SeriesSummary, StudySummary
from web_viewer_api.dicomweb.qido import (
    instance_to_dicom_json,
    series_to_dicom_json,
    study_to_dicom_json,
)

BASE = "https://gw.example/dicom-web"

STUDY = StudySummary(
    study_instance_uid="2.25.1", patient_id="PSEUDO1", patient_name="ANON^P1=ＡＮＯＮ^Ｐ１",
    patient_birth_date="19700101", patient_sex="F", study_date="20240102", study_time="101500",
    accession_number="ACC1", study_id="S1", study_description="CT THORAX",
    referring_physician_name="", specific_character_set="ISO_IR 100\\ISO 2022 IR 87",
    modalities_in_study=("CT", "SR"), number_of_series=0, number_of_instances=12)


def _pydicom_study(study: StudySummary) -> dict[str, object]:
    dataset = Dataset()
    if study.specific_character_set:
        dataset.SpecificCharacterSet = study.specific_character_set.split("\\")
    for keyword, value in (
            ("StudyDate", study.study_date), ("StudyTime", study.study_time),
            ("AccessionNumber", study.accession_number),
            ("ModalitiesInStudy", list(study.modalities_in_study)),
            ("ReferringPhysicianName", study.referring_physician_name),
            ("PatientName", study.patient_name), ("PatientID", study.patient_id),
            ("PatientBirthDate", study.patient_birth_date), ("PatientSex", study.patient_sex),
            ("StudyInstanceUID", study.study_instance_uid), ("StudyID", study.study_id),
            ("StudyDescription", study.study_description),
            ("NumberOfStudyRelatedSeries", study.number_of_series),
            ("NumberOfStudyRelatedInstances", study.number_of_instances),
            ("RetrieveURL", f"{BASE}/studies/{study.study_instance_uid}")):
        setattr(dataset, keyword, value)
    return dataset.to_json_dict()


@pytest.mark.parametrize("changes", [
    {},
    {"specific_character_set": "", "patient_name": "ANON^ONLY", "modalities_in_study": ()},
    {"patient_name": "", "study_date": "", "number_of_instances": 0},
    {"patient_name": "==PHONETIC", "modalities_in_study": ("MR",)},
    {"patient_name": "ANON^X=", "study_time": ""},
])
def test_study_json_matches_pydicom(changes: dict[str, object]) -> None:
    study = dataclasses.replace(STUDY, **changes)  # type: ignore[arg-type]
    assert study_to_dicom_json(study, BASE) == _pydicom_study(study)


@pytest.mark.parametrize(("number", "started"), [(7, ("20240102", "101500.25")), (None, ("", ""))])
def test_series_json_matches_pydicom(number: int | None, started: tuple[str, str]) -> None:
    series = SeriesSummary(study_instance_uid="2.25.1", series_instance_uid="2.25.1.2",
                           modality="CT", series_number=number, series_description="",
                           body_part_examined="CHEST", number_of_instances=3,
                           performed_procedure_step_start_date=started[0],
                           performed_procedure_step_start_time=started[1])
    dataset = Dataset()
    dataset.Modality = "CT"
    dataset.SeriesInstanceUID = "2.25.1.2"
    dataset.SeriesNumber = number if number is not None else ""
    dataset.SeriesDescription = ""
    dataset.BodyPartExamined = "CHEST"
    dataset.NumberOfSeriesRelatedInstances = 3
    dataset.PerformedProcedureStepStartDate, dataset.PerformedProcedureStepStartTime = started
    dataset.StudyInstanceUID = "2.25.1"
    dataset.RetrieveURL = f"{BASE}/studies/2.25.1/series/2.25.1.2"
    assert series_to_dicom_json(series, BASE) == dataset.to_json_dict()


@pytest.mark.parametrize(("rows", "frames"), [(512, 20), (None, None)])
def test_instance_json_matches_pydicom(rows: int | None, frames: int | None) -> None:
    instance = InstanceSummary(
        study_instance_uid="2.25.1", series_instance_uid="2.25.1.2",
        sop_instance_uid="2.25.1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=4, rows=rows, columns=rows, number_of_frames=frames,
        transfer_syntax_uid="1.2.840.10008.1.2.4.80", object_key="k", size_bytes=1,
        sha256="0", modality="CT", updated_at=None)
    dataset = Dataset()
    dataset.SOPClassUID = instance.sop_class_uid
    dataset.SOPInstanceUID = instance.sop_instance_uid
    dataset.AvailableTransferSyntaxUID = instance.transfer_syntax_uid
    dataset.Modality = "CT"
    dataset.StudyInstanceUID = "2.25.1"
    dataset.SeriesInstanceUID = "2.25.1.2"
    dataset.InstanceNumber = 4
    if rows:
        dataset.Rows, dataset.Columns = rows, rows
    if frames:
        dataset.NumberOfFrames = frames
    dataset.RetrieveURL = f"{BASE}/studies/2.25.1/series/2.25.1.2/instances/2.25.1.2.3"
    assert instance_to_dicom_json(instance, BASE) == dataset.to_json_dict()
