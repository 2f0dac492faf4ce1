"""Hostile inputs, built small: a deflated data set that declares gigabytes of pixels, and
the peak memory of a running gateway's processes (VmHWM from /proc)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

_CHUNK = 1 << 20


def deflate_bomb(path: Path, *, rows: int = 8192, columns: int = 8192, frames: int = 2) -> Path:
    """A CT instance in Deflated Explicit VR Little Endian whose Pixel Data is
    rows × columns × frames 16-bit zeros: about a hundred kilobytes on disk, gigabytes
    once inflated. Written as a stream (the zeros are never in memory)."""
    dataset = Dataset()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientID, dataset.PatientName = "IPP-BOMB", "BOMB^TEST"
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = rows, columns, frames
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    pixel_bytes = rows * columns * frames * 2
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, dataset.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta_buffer = DicomBytesIO()
    meta_buffer.is_little_endian, meta_buffer.is_implicit_VR = True, False
    write_file_meta_info(meta_buffer, meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM" + meta_buffer.getvalue())
        handle.write(deflater.compress(body.getvalue() + header))
        zeros = bytes(_CHUNK)
        left = pixel_bytes
        while left:
            step = min(left, _CHUNK)
            handle.write(deflater.compress(zeros[:step]))
            left -= step
        handle.write(deflater.flush())
    return path


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: the most resident memory it ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for process {pid}")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def gateway_processes(serve_pid: int) -> dict[int, str]:
    """The processes of a running `serve`, each named by its component (node, worker, api;
    Celery's pool processes are "worker" too)."""
    named = {}
    for pid in descendants(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        component = next((w for w in reversed(words) if w in ("node", "worker", "api")), None)
        if component is None and any("celery" in w or "gateway" in w for w in words):
            component = "worker"
        if component is not None:
            named[pid] = component
    return named


def peaks(serve_pid: int) -> dict[int, tuple[str, int]]:
    """(component, VmHWM) of each process of a running `serve`."""
    result = {}
    for pid, component in gateway_processes(serve_pid).items():
        try:
            result[pid] = (component, peak_rss_bytes(pid))
        except (OSError, ValueError):
            continue  # ended meanwhile
    return result


__all__ = ["deflate_bomb", "descendants", "gateway_processes", "peak_rss_bytes", "peaks"]
