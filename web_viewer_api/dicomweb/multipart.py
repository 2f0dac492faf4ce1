"""Media types of DICOMweb: Accept negotiation (PS3.18 §8.7) and multipart/related bodies."""

from __future__ import annotations

import collections
import functools
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import anyio
import anyio.lowlevel

from storage import OpenedObject

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ANY_TRANSFER_SYNTAX = "*"


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: type, parameters, quality."""

    media_type: str
    params: Mapping[str, str] = field(default_factory=dict)
    quality: float = 1.0


def _split_unquoted(text: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes; drop empty pieces."""
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_accept(header: str | None) -> tuple[MediaRange, ...]:
    """The media ranges of an Accept header, best first (q-values honoured)."""
    return _parse_accept(header or "")


@functools.lru_cache(maxsize=256)  # clients send the same few headers again and again
def _parse_accept(header: str) -> tuple[MediaRange, ...]:
    if not header:
        return (MediaRange("*/*"),)
    ranges = []
    for entry in _split_unquoted(header, ","):
        pieces = _split_unquoted(entry, ";")
        if not pieces:
            continue
        params: dict[str, str] = {}
        quality = 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            else:
                params[name] = value
        ranges.append(MediaRange(pieces[0].lower(), MappingProxyType(params), quality))
    return tuple(sorted((r for r in ranges if r.quality > 0), key=lambda r: -r.quality))


def new_boundary() -> str:
    return f"dicomgateway-{uuid.uuid4().hex}"


#: (content type, body, extra headers).
Part = tuple[str, bytes, dict[str, str]]
#: A part of a streamed answer: its body may still be in its store, read as it is sent.
StreamedPart = tuple[str, bytes | OpenedObject, dict[str, str]]

#: Objects opened ahead by one hand-off to a worker thread. Each holds a file descriptor
#: until it is sent, a slow client's too (the store caps how many it keeps open at once).
OPEN_AHEAD = 16
#: Largest object read on the event loop from the page cache, and how much the loop reads
#: before it lets other requests run: larger objects are read in a worker thread.
LOOP_READ_MAX = 1 << 20


def _pieces(parts: Iterable[StreamedPart], boundary: str) -> Iterator[bytes | OpenedObject]:
    """The body of a multipart/related answer as it comes: each part's head, then its
    body untouched (content type, body, extra headers per part)."""
    delimiter = ""
    for content_type, body, headers in parts:
        lines = [
            f"{delimiter}--{boundary}",
            f"Content-Type: {content_type}",
            *(f"{name}: {value}" for name, value in headers.items()),
            "",
            "",
        ]
        yield "\r\n".join(lines).encode()
        yield body
        delimiter = "\r\n"
    yield f"{delimiter}--{boundary}--\r\n".encode()


def as_bytes(body: bytes | OpenedObject) -> bytes:
    """A part's body as bytes: an opened object is read (waiting on the disk if need be,
    so in a worker thread) and closed."""
    if isinstance(body, bytes):
        return body
    try:
        return body.read()
    finally:
        body.close()


def multipart_stream(
    parts: Iterable[StreamedPart], boundary: str, chunk_bytes: int = 1 << 20
) -> Iterator[bytes]:
    """A multipart/related body in chunks of about `chunk_bytes`; memory stays bounded by
    one part plus one chunk."""
    pending: list[bytes] = []
    size = 0
    for piece in _pieces(parts, boundary):
        pending.append(as_bytes(piece))
        size += len(pending[-1])
        if size >= chunk_bytes:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


async def multipart_body(
    parts: Iterable[StreamedPart], boundary: str, batch_bytes: int = 1 << 20
) -> AsyncIterator[bytes | memoryview]:
    """A multipart/related body for a streamed answer. The parts are produced (objects
    opened or read, converted) in a worker thread, a batch of about `batch_bytes` read, or
    `OPEN_AHEAD` objects opened, at a time. An opened object's bytes are taken on the event
    loop when the page cache holds them (a read that cannot wait; each hand-off to a thread
    and back costs more than reading a cached object), else in a worker thread with the
    opened objects after it, about `batch_bytes` per hand-off. Memory stays bounded by one
    batch plus one part; the event loop never waits on a disk, and lets other requests run
    after each `LOOP_READ_MAX` it reads."""
    pieces = _pieces(parts, boundary)
    taken: collections.deque[bytes | OpenedObject] = collections.deque()
    # Objects read on the loop are closed by the next call in a worker thread: the last close
    # of a file deleted meanwhile frees its blocks, which may wait on the disk.
    done: list[OpenedObject] = []

    def close_done() -> None:
        while done:
            done.pop().close()

    def batch() -> list[bytes | OpenedObject]:
        close_done()
        found: list[bytes | OpenedObject] = []
        size = opened = 0
        try:
            for piece in pieces:
                found.append(piece)
                if isinstance(piece, bytes):
                    size += len(piece)
                else:
                    opened += 1
                if size >= batch_bytes or opened >= OPEN_AHEAD:
                    break
        except BaseException:  # a part that failed: the ones opened before it are let go now
            for piece in found:
                if not isinstance(piece, bytes):
                    piece.close()
            raise
        return found

    def read_run() -> list[bytes]:
        """In a worker thread: the opened object first in `taken` and the ones after it,
        up to about `batch_bytes`, read and closed (the heads between them kept): one
        hand-off for a run of objects the page cache did not have."""
        close_done()
        run: list[bytes] = []
        size = 0
        while taken and (not run or size < batch_bytes):
            run.append(as_bytes(taken.popleft()))
            size += len(run[-1])
        return run

    read_on_loop = 0
    try:
        while taken := collections.deque(await anyio.to_thread.run_sync(batch)):
            while taken:
                piece = taken[0]
                if isinstance(piece, bytes):
                    taken.popleft()
                    yield piece
                    continue
                cached = piece.read_cached() if (piece.size or 0) <= LOOP_READ_MAX else None
                if cached is None:  # `piece` stays in `taken` until read_run owns it
                    for body in await anyio.to_thread.run_sync(read_run):
                        yield body
                    continue
                taken.popleft()
                done.append(piece)
                yield cached
                read_on_loop += len(cached)
                if read_on_loop >= LOOP_READ_MAX:  # nothing above waited: let others run
                    read_on_loop = 0
                    await anyio.lowlevel.checkpoint()
    finally:  # a client gone mid-answer: what was opened ahead is released now
        for piece in [*done, *taken]:
            if not isinstance(piece, bytes):
                piece.close()


def multipart_content_type(
    part_type: str, boundary: str, transfer_syntax: str | None = None
) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value
