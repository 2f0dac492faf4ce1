"""S3 object store (AWS, MinIO, Ceph RGW, SeaweedFS) through boto3."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from storage.objects import (
    AlreadyExists,
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    join_key,
    validate_key,
)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_BAD_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}


def _translate(exc: Exception, key: str) -> StorageError:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _NOT_FOUND:
            return ObjectNotFound(key)
        if code == "PreconditionFailed" or status == 412:
            return AlreadyExists(key)
        if code in _BAD_DIGEST:
            return IntegrityError(f"checksum mismatch storing {key!r}")
        # 409 ConditionalRequestConflict: a racing conditional write; the retry gets 412.
        if (
            status >= 500
            or status == 409
            or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable")
        ):
            return TransientStorageError(f"S3 error {code} on {key!r}")
        return StorageError(f"S3 error {code} on {key!r}")
    if isinstance(exc, BotoConnectionError | BotoCoreError):
        return TransientStorageError(f"S3 unreachable on {key!r}: {type(exc).__name__}")
    return StorageError(f"S3 failure on {key!r}: {type(exc).__name__}")


MULTIPART_THRESHOLD = 64 * 1024 * 1024


class S3ObjectStore:
    """Objects in one bucket under an optional key prefix.

    Every put carries a SHA-256 checksum the server verifies (and Content-MD5 for single
    puts); bodies from `multipart_threshold` bytes up go as a multipart upload with a
    SHA-256 checksum per part. `server_side_encryption` ("AES256" or "aws:kms", with
    `kms_key_id`) asks the server to encrypt at rest.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        server_side_encryption: str | None = None,
        kms_key_id: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.encryption: dict[str, str] = {}
        if server_side_encryption:
            self.encryption["ServerSideEncryption"] = server_side_encryption
            if kms_key_id:
                self.encryption["SSEKMSKeyId"] = kms_key_id
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold // 2, 5 * 1024 * 1024),
        )
        self.prefix = validate_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
                # Seaweed/MinIO/Ceph differ on the newer flexible checksums; Content-MD5 is universal.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
        full_key = self._full(key)
        try:
            if len(body) >= self.transfer.multipart_threshold:
                self.client.upload_fileobj(
                    BytesIO(body),
                    self.bucket,
                    full_key,
                    Config=self.transfer,
                    ExtraArgs={
                        "ContentType": content_type,
                        "ChecksumAlgorithm": "SHA256",
                        **self.encryption,
                    },
                )
                return
            self.client.put_object(**self._single_put(full_key, body, content_type))
        except Exception as exc:  # translated once, here
            raise _translate(exc, key) from exc

    def create(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
        """A conditional put (`If-None-Match: *`, S3 since 2024, SeaweedFS, MinIO, Ceph
        RGW): the server refuses it with 412 when the key exists, so of two racing
        writers exactly one wins. One request whatever the size (S3 allows 5 GB)."""
        full_key = self._full(key)
        try:
            self.client.put_object(
                IfNoneMatch="*", **self._single_put(full_key, body, content_type)
            )
        except Exception as exc:
            raise _translate(exc, key) from exc

    def check_write_once(self) -> None:
        """Raise StorageError unless the server honours `If-None-Match: *` (older
        S3-compatible servers ignore it: there `create` would replace an object)."""
        probe = f".write-once-probe/{secrets.token_hex(8)}"
        self.create(probe, b"first", content_type="text/plain")
        try:
            self.create(probe, b"second", content_type="text/plain")
        except AlreadyExists:
            return
        finally:
            self.delete(probe)
        raise StorageError(
            "the S3 server ignores conditional writes (If-None-Match: *): stored "
            "instances could be replaced; use a server that supports them"
        )

    def _single_put(self, full_key: str, body: bytes, content_type: str) -> dict[str, Any]:
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
        return {
            "Bucket": self.bucket,
            "Key": full_key,
            "Body": body,
            "ContentType": content_type,
            "ContentMD5": md5,
            "ChecksumSHA256": sha256,
            **self.encryption,
        }

    def get(self, key: str) -> bytes:
        full_key = self._full(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full_key)
            return bytes(response["Body"].read())
        except Exception as exc:
            raise _translate(exc, key) from exc

    def head(self, key: str) -> ObjectInfo:
        full_key = self._full(key)
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=full_key)
        except Exception as exc:
            raise _translate(exc, key) from exc
        return ObjectInfo(key, int(response["ContentLength"]))

    def delete(self, key: str) -> None:
        full_key = self._full(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full_key)
        except Exception as exc:
            raise _translate(exc, key) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"][len(self.prefix) :], int(item["Size"]))
        except Exception as exc:
            raise _translate(exc, prefix) from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _translate(exc, self.bucket) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket when missing (deployments that own their bucket)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except Exception as exc:
                raise _translate(exc, self.bucket) from exc


__all__ = ["S3ObjectStore", "join_key"]
