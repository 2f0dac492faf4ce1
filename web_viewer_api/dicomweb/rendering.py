"""What a rendered or thumbnail request may cost: the largest frame rendered, and a cache of
rendered images so that a frame asked for again is not decoded again.

`RenderLimits` is checked against the declared matrix (index row, then header) before any
pixel is decoded; `RenderedCache` is a byte-bounded LRU shared by the threads that render.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["RenderLimits", "RenderedCache"]


@dataclass(frozen=True)
class RenderLimits:
    """The largest frame a rendered or thumbnail request decodes: Rows x Columns (in
    millions of pixels) and its decoded size (x Samples per Pixel x Bits Allocated / 8).
    The defaults pass any real modality's frame (a full-field mammogram is about 23
    megapixels, 46 MB at 16 bits) and refuse a small object declaring a matrix whose
    render would cost seconds and gigabytes. Decoding peaks at about four times the decoded
    frame (8192 x 8192 x 16 bits in JPEG-LS: +512 MiB, measured), hence 80 MiB a frame."""

    max_frame_megapixels: float = 64.0
    max_frame_bytes: int = 80 * 1024 * 1024
    #: Byte budget of the rendered-image cache (0: no cache).
    cache_bytes: int = 64 * 1024 * 1024

    def refusal(
        self, rows: int, columns: int, samples: int = 1, bits_allocated: int = 8
    ) -> str | None:
        """Why a frame of this declared matrix is not rendered (None: it may be)."""
        pixels = rows * columns
        if pixels > self.max_frame_megapixels * 1_000_000:
            return (
                f"the frame is {columns} x {rows} pixels ({pixels / 1e6:.1f} megapixels); "
                f"images are rendered up to {self.max_frame_megapixels:g} megapixels a frame"
            )
        decoded = pixels * max(samples, 1) * max((bits_allocated + 7) // 8, 1)
        if decoded > self.max_frame_bytes:
            return (
                f"the frame decodes to {decoded // (1024 * 1024)} MiB; images are rendered "
                f"up to {self.max_frame_bytes // (1024 * 1024)} MiB a frame"
            )
        return None


class RenderedCache:
    """Rendered images by what determines them (the stored object, frame, media type,
    window, size, quality), least recently used dropped first once `budget_bytes` is
    exceeded. Thread-safe (renders run in the threadpool). An image larger than the whole
    budget is not kept; a budget of 0 keeps nothing. `on_lookup("hit" | "miss")` is called
    on each lookup (a metric)."""

    def __init__(self, budget_bytes: int, on_lookup: Callable[[str], None] | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._on_lookup = on_lookup
        self._images: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: Answers served from the cache, and lookups that found nothing (then a render).
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        """The cached image, or None (the caller renders, and may `put` it)."""
        with self._lock:
            found = self._images.get(key)
            if found is None:
                self.misses += 1
            else:
                self._images.move_to_end(key)
                self.hits += 1
        if self._on_lookup is not None:
            self._on_lookup("miss" if found is None else "hit")
        return found

    def put(self, key: Hashable, image: bytes) -> None:
        if len(image) > self.budget_bytes:
            return
        with self._lock:
            previous = self._images.pop(key, None)
            if previous is not None:
                self._bytes -= len(previous)
            self._images[key] = image
            self._bytes += len(image)
            while self._bytes > self.budget_bytes:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= len(dropped)

    @property
    def size_bytes(self) -> int:
        """Bytes of images held now."""
        with self._lock:
            return self._bytes
