"""One frame of a stored image rendered for people: fitted to a size, windowed (VOI LUT or
window, else the frame's range), palette and colour converted, as a PIL image or a small
PNG. Pure functions, no I/O: the worker renders thumbnails with them, the API rendered
frames."""

from __future__ import annotations

import copy
from io import BytesIO
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

__all__ = ["RenderError", "has_pixel_data", "render_frame", "render_thumbnail"]

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class RenderError(ValueError):
    """A frame cannot be rendered from the given data set (no pixel data, no such frame,
    pixels the codecs cannot decode)."""


# --------------------------------------------------------------------------- thumbnails


def has_pixel_data(dataset: Dataset) -> bool:
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
                bounds = apply_voi_lut(np.array([-1e300, 1e300]), view, index=0, prefer_lut=False)
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
        rows, factor, columns, factor, *frame.shape[2:]
    )
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

    Raises `RenderError` for a dataset without pixel data (e.g. read with
    `stop_before_pixels=True`, made from DICOM JSON with a BulkDataURI, or an SR), for a
    frame that does not exist and for pixel data that cannot be decoded.
    """
    if size < 1:
        raise ValueError(f"thumbnail size must be at least 1, not {size}")
    if not _has_pixel_values(dataset):
        raise RenderError(
            "cannot render a thumbnail: the dataset has no pixel data "
            f"(SOP Class {dataset.get('SOPClassUID', 'unknown')})"
        )
    frames = _number_of_frames(dataset)
    index = frames // 2 if frame_index is None else frame_index
    if not 0 <= index < frames:
        raise RenderError(f"frame {index + 1} does not exist ({frames} frames)")
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
                raise RenderError(f"unexpected colour pixel array shape {pixels.shape}")
            image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]), mode="RGB")
    except RenderError:
        raise
    except Exception as exc:  # decoder plugins raise many types: report one
        raise RenderError(f"cannot render a thumbnail: {exc}") from exc
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def render_thumbnail(dataset: Dataset, size: int = 128, frame_index: int | None = None) -> bytes:
    """`render_frame` as a PNG (the middle frame of a multi-frame image by default).

    Raises `RenderError` as `render_frame` does.
    """
    out = BytesIO()
    render_frame(dataset, size, frame_index).save(out, format="PNG", optimize=False)
    return out.getvalue()
