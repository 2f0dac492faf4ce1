"""Media types of DICOMweb: Accept negotiation (PS3.18 §8.7) and multipart/related bodies."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

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
#: A part's body, whatever it is until it is sent.
B = TypeVar("B")


def multipart_pieces(
    parts: Iterable[tuple[str, B, dict[str, str]]], boundary: str
) -> Iterator[bytes | B]:
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


def multipart_stream(
    parts: Iterable[Part], boundary: str, chunk_bytes: int = 1 << 20
) -> Iterator[bytes]:
    """A multipart/related body in chunks of about `chunk_bytes`; memory stays bounded by
    one part plus one chunk."""
    pending: list[bytes] = []
    size = 0
    for piece in multipart_pieces(parts, boundary):
        pending.append(piece)
        size += len(piece)
        if size >= chunk_bytes:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def multipart_content_type(
    part_type: str, boundary: str, transfer_syntax: str | None = None
) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value
