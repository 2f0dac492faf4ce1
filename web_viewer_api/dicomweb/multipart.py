"""Media types of DICOMweb: Accept negotiation (PS3.18 §8.7) and multipart/related bodies."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ANY_TRANSFER_SYNTAX = "*"


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: type, parameters, quality."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
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


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (q-values honoured)."""
    if not header:
        return [MediaRange("*/*")]
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
        ranges.append(MediaRange(pieces[0].lower(), params, quality))
    return sorted((r for r in ranges if r.quality > 0), key=lambda r: -r.quality)


def new_boundary() -> str:
    return f"dicomgateway-{uuid.uuid4().hex}"


def multipart_stream(parts: Iterable[tuple[str, bytes, dict[str, str]]], boundary: str,
                     chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Yield a multipart/related body: (content type, body, extra headers) per part.

    Small parts are gathered into chunks of about `chunk_bytes` (each chunk costs a thread
    hop in the ASGI server); memory stays bounded by one part plus one chunk.
    """
    pending: list[bytes] = []
    size = 0
    for content_type, body, headers in parts:
        lines = [f"--{boundary}", f"Content-Type: {content_type}",
                 *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        pending += ["\r\n".join(lines).encode(), body, b"\r\n"]
        size += len(body)
        if size >= chunk_bytes:
            yield b"".join(pending)
            pending, size = [], 0
    pending.append(f"--{boundary}--\r\n".encode())
    yield b"".join(pending)


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value
