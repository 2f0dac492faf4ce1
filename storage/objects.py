"""The object store protocol, its typed errors, and safe key handling."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._\-]+")  # whole segment (fullmatch: no trailing newline)


class StorageError(Exception):
    """Base of every storage failure."""


class TransientStorageError(StorageError):
    """The store could not be reached or answered a server error: retrying may succeed."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class InvalidKey(StorageError, ValueError):
    """A key that could escape its prefix or is not made of safe segments."""


class IntegrityError(StorageError):
    """The stored bytes do not match the checksum sent with them."""


class AlreadyExists(StorageError):
    """`create` found an object under the key: the first writer's object stays."""


def validate_key(key: str) -> str:
    """Return `key` if every '/'-separated segment is safe, else raise InvalidKey."""
    segments = key.split("/")
    if not key or any(s in ("", ".", "..") or not _KEY_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidKey(f"unsafe object key: {key!r}")
    return key


def join_key(*segments: str) -> str:
    """Join key segments, refusing any that would add a separator or climb."""
    for segment in segments:
        if "/" in segment:
            raise InvalidKey(f"key segment contains '/': {segment!r}")
    return validate_key("/".join(segments))


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows of an object without reading it."""

    key: str
    size: int


@runtime_checkable
class ObjectStore(Protocol):
    """Blob storage under validated keys: write-once objects (`create`) and replaceable ones (`put`)."""

    def put(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
        """Store `body` under `key`, replacing any object there; verified by checksum. For
        derived objects (metadata, thumbnails, manifests) only: instances use `create`."""

    def create(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
        """Store `body` under `key` only if no object is there (AlreadyExists otherwise),
        atomically: of two racing writers exactly one wins; verified by checksum."""

    def get(self, key: str) -> bytes:
        """The bytes under `key`; ObjectNotFound when absent."""

    def head(self, key: str) -> ObjectInfo:
        """Size of the object under `key`; ObjectNotFound when absent."""

    def delete(self, key: str) -> None:
        """Remove `key`; absent keys are not an error."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order."""

    def check(self) -> None:
        """Raise StorageError when the store is not usable (health check)."""
