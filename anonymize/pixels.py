"""Clean Pixel Data policy: burned-in text is masked by a configured rectangle, or refused.

An instance is at risk when it says BurnedInAnnotation=YES, or when its modality or SOP
class is known to carry burned-in text (ultrasound, secondary capture, endoscopy,
photography, documents). An instance at risk is de-identified only if a configured mask
matches it (modality, optional manufacturer, matrix size); otherwise it is refused with a
reason, and the worker quarantines it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

#: Modalities whose images routinely carry burned-in patient text.
DEFAULT_RISKY_MODALITIES = frozenset({"US", "SC", "ES", "XC", "GM", "OT", "DOC", "IVUS", "OP"})
#: SOP classes (prefixes) known to carry burned-in text or whole documents.
DEFAULT_RISKY_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture family (incl. multi-frame)
    "1.2.840.10008.5.1.4.1.1.104",  # Encapsulated PDF / CDA / STL / OBJ / MTL
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic (and video)
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic (and video)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound (single and multi-frame)
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
)
#: Whole-slide imaging: its LABEL and OVERVIEW images show the slide label (name, barcode).
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class BurnedInAnnotationRisk(ValueError):
    """The pixels may show identity and no mask applies: the instance must not leave."""


@dataclass(frozen=True)
class PixelMask:
    """Rectangles (x, y, width, height) blacked out on every frame of matching instances."""

    modality: str
    rows: int
    columns: int
    rectangles: tuple[tuple[int, int, int, int], ...]
    manufacturer: str | None = None

    def matches(self, dataset: Dataset) -> bool:
        if str(dataset.get("Modality", "")).upper() != self.modality.upper():
            return False
        if int(dataset.get("Rows", 0) or 0) != self.rows:
            return False
        if int(dataset.get("Columns", 0) or 0) != self.columns:
            return False
        if self.manufacturer is not None:
            found = str(dataset.get("Manufacturer", "") or "").strip().upper()
            return found == self.manufacturer.strip().upper()
        return True


@dataclass(frozen=True)
class PixelPolicy:
    """Which instances are at risk, and the masks that make them safe."""

    masks: tuple[PixelMask, ...] = ()
    risky_modalities: frozenset[str] = DEFAULT_RISKY_MODALITIES
    risky_sop_class_prefixes: tuple[str, ...] = DEFAULT_RISKY_SOP_CLASS_PREFIXES
    extra_risky: frozenset[str] = field(default_factory=frozenset)

    def risk(self, dataset: Dataset) -> str | None:
        """Why the pixels of `dataset` may show identity, or None."""
        if str(dataset.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
            return "BurnedInAnnotation is YES"
        if str(dataset.get("RecognizableVisualFeatures", "") or "").strip().upper() == "YES":
            return "RecognizableVisualFeatures is YES"
        image_type = {str(v).upper() for v in (dataset.get("ImageType") or [])}
        if str(dataset.get("SOPClassUID", "")) == WSI_SOP_CLASS and image_type & {
            "LABEL",
            "OVERVIEW",
        }:
            return "whole-slide LABEL/OVERVIEW image shows the slide label"
        modality = str(dataset.get("Modality", "") or "").strip().upper()
        if modality in self.risky_modalities:
            return f"modality {modality} routinely carries burned-in text"
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        if any(
            sop_class == p or sop_class.startswith(p + ".") for p in self.risky_sop_class_prefixes
        ):
            return f"SOP class {sop_class} routinely carries burned-in text or documents"
        return None

    def mask_for(self, dataset: Dataset) -> PixelMask | None:
        return next((m for m in self.masks if m.matches(dataset)), None)


def apply_mask(dataset: Dataset, mask: PixelMask) -> None:
    """Black out the mask's rectangles on every frame; pixels are rewritten uncompressed.

    The instance keeps its SOP Instance UID: the same input masked twice is one instance
    (the de-identifier then maps that UID as it maps every other).
    """
    if "PixelData" not in dataset:
        raise BurnedInAnnotationRisk("instance at risk has no pixel data to mask (a document?)")
    pixels = np.array(dataset.pixel_array, copy=True)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    view = pixels if frames > 1 else pixels[np.newaxis, ...]
    for x, y, width, height in mask.rectangles:
        view[:, y : y + height, x : x + width, ...] = 0
    photometric = str(dataset.PhotometricInterpretation)
    if samples == 3 and photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom's decoder returns RGB for YCbCr-coded JPEG
    # pydicom would otherwise give the instance a new random SOP Instance UID at each call
    dataset.set_pixel_data(
        pixels,
        photometric_interpretation=photometric,
        bits_stored=int(dataset.BitsStored),
        generate_instance_uid=False,
    )
    dataset.BurnedInAnnotation = "NO"
