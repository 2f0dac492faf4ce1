"""A series of real CT slices for viewer tests and benchmarks: pydicom-data's 693_UNCR
(512x512, 14-bit), each slice shifted by a row so that no two frames are alike."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def real_ct_series(folder: Path, slices: int) -> Path:
    """`slices` files of one new study and series in `folder` (created); returns it."""
    source = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    pixels = source.pixel_array
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for number in range(1, slices + 1):
        dataset = copy.deepcopy(source)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number
        dataset.ImagePositionPatient = [0, 0, float(number)]
        dataset.PixelData = np.roll(pixels, number, axis=0).tobytes()
        dataset.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)
    return folder
