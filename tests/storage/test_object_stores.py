"""One conformance module run against every object-store backend (filesystem, real S3)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import (
    AlreadyExists,
    FilesystemObjectStore,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    S3ObjectStore,
    StorageError,
    TransientStorageError,
    instance_key,
)
from tests.support.seaweedfs import SeaweedFS
from tests.support.services import free_port


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "filesystem":
        yield FilesystemObjectStore(tmp_path / "objects")
        return
    seaweedfs: SeaweedFS = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    yield S3ObjectStore(
        bucket, prefix="gateway", endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region,
        access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key,
    )


def test_put_then_get_returns_the_same_bytes(store: ObjectStore) -> None:
    key = instance_key("2.25.1", "2.25.2", "2.25.3")
    body = bytes(range(256)) * 1000
    store.put(key, body)
    assert store.get(key) == body
    assert store.head(key).size == len(body)


def test_put_overwrites(store: ObjectStore) -> None:
    store.put("studies/a/x.dcm", b"one")
    store.put("studies/a/x.dcm", b"two")
    assert store.get("studies/a/x.dcm") == b"two"


def test_create_never_replaces_an_existing_object(store: ObjectStore) -> None:
    key = instance_key("2.25.1", "2.25.2", "2.25.9")
    store.create(key, b"first writer")
    with pytest.raises(AlreadyExists):
        store.create(key, b"second writer")
    assert store.get(key) == b"first writer"
    assert [info.key for info in store.list("studies/2.25.1/")] == [key]  # no temporary left


def test_of_racing_creators_exactly_one_wins(store: ObjectStore) -> None:
    key = instance_key("2.25.1", "2.25.2", "2.25.10")
    bodies = [f"writer {n}".encode() * 1000 for n in range(8)]
    start = threading.Barrier(len(bodies))
    won: list[bytes] = []
    lost: list[bytes] = []

    def write(body: bytes) -> None:
        start.wait()
        try:
            store.create(key, body)
            won.append(body)
        except AlreadyExists:
            lost.append(body)

    threads = [threading.Thread(target=write, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == len(bodies) - 1
    assert store.get(key) == won[0]


def test_missing_object_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("studies/none.dcm")
    with pytest.raises(ObjectNotFound):
        store.head("studies/none.dcm")


def test_list_is_prefix_scoped_and_sorted(store: ObjectStore) -> None:
    for key in ("studies/b/2.dcm", "studies/a/1.dcm", "studies/b/1.dcm", "other/z.dcm"):
        store.put(key, key.encode())
    listed = [info.key for info in store.list("studies/b/")]
    assert listed == ["studies/b/1.dcm", "studies/b/2.dcm"]
    assert [i.key for i in store.list("studies/")] == [
        "studies/a/1.dcm", "studies/b/1.dcm", "studies/b/2.dcm"]


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("studies/d.dcm", b"x")
    store.delete("studies/d.dcm")
    store.delete("studies/d.dcm")
    with pytest.raises(ObjectNotFound):
        store.get("studies/d.dcm")


@pytest.mark.parametrize("key", ["../escape.dcm", "studies/../../x", "/abs", "a//b", "a/b/", "sp ace",
                                 "..\n", "a\n/b", "a/b\n"])
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(key, b"x")


def test_filesystem_store_lists_what_it_reads_through_a_linked_folder(tmp_path: Path) -> None:
    """A `studies` folder linked to another disk: listed (reindex sees it) as it is read."""
    other_disk = tmp_path / "disk2"
    other_disk.mkdir()
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "studies").symlink_to(other_disk, target_is_directory=True)
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/series/3.4/5.6.dcm", b"DICM")
    assert (other_disk / "1.2" / "series" / "3.4" / "5.6.dcm").read_bytes() == b"DICM"
    assert store.get("studies/1.2/series/3.4/5.6.dcm") == b"DICM"
    assert [info.key for info in store.list("studies/")] == ["studies/1.2/series/3.4/5.6.dcm"]


def test_filesystem_listing_walks_a_link_cycle_once_and_refuses_broken_links(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/series/3.4/5.6.dcm", b"DICM")
    series = tmp_path / "objects" / "studies" / "1.2" / "series"
    (series / "loop").symlink_to(series, target_is_directory=True)  # a cycle
    (series / "again").symlink_to(series, target_is_directory=True)  # the same folder twice
    assert [info.key for info in store.list("studies/")] == ["studies/1.2/series/3.4/5.6.dcm"]
    (series / "3.4" / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    with pytest.raises(StorageError, match="cannot list"):
        list(store.list("studies/"))



def test_an_object_that_is_not_a_plain_file_is_read_in_full_or_fails_loudly(tmp_path: Path) -> None:
    """A /proc file says it is empty: reading it fails with a StorageError, never an empty
    object. A folder where an object should be is none, to `get` and to `open` alike."""
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/a.dcm", b"DICM")
    os.symlink("/proc/self/mem", tmp_path / "objects" / "studies" / "1.2" / "mem.dcm")  # reading it: EIO
    with pytest.raises(StorageError, match="cannot read object"):
        store.get("studies/1.2/mem.dcm")
    for key in ("studies/1.2", "studies/1.2/missing.dcm"):
        with pytest.raises(ObjectNotFound):
            store.get(key)
        with pytest.raises(ObjectNotFound):
            store.open(key)
    with store.open("studies/1.2/a.dcm") as opened:  # a plain file object, closed by its caller
        assert opened.read() == b"DICM"


def test_check_passes_on_a_usable_store(store: ObjectStore) -> None:
    store.check()


def test_unreachable_s3_is_a_transient_error() -> None:
    store = S3ObjectStore("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          region="us-east-1", access_key="a", secret_key="b")
    with pytest.raises(TransientStorageError):
        store.put("studies/x.dcm", b"x")


def test_wrong_credentials_are_refused_by_the_real_server(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region,
                          access_key=seaweedfs.access_key, secret_key="wrong-secret")
    with pytest.raises(Exception) as info:
        store.put("studies/x.dcm", b"x")
    assert not isinstance(info.value, ObjectNotFound)


def test_large_objects_go_multipart_with_checksums(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region,
                          access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key,
                          multipart_threshold=5 * 1024 * 1024)
    calls: list[str] = []
    part_headers: list[dict[str, str]] = []

    def record_call(model: object, **_: object) -> None:
        calls.append(str(getattr(model, "name", "")))

    def record_part(request: object, **_: object) -> None:
        headers = getattr(request, "headers", {})
        part_headers.append({k.lower(): (v.decode() if isinstance(v, bytes) else str(v))
                             for k, v in headers.items()})

    store.client.meta.events.register("before-call.s3", record_call)
    store.client.meta.events.register("before-send.s3.UploadPart", record_part)
    body = bytes(range(256)) * (12 * 4096)  # 12 MiB: three parts of 5 MiB at most
    store.put("studies/big/multiframe.dcm", body)
    assert store.get("studies/big/multiframe.dcm") == body
    assert calls[0] == "CreateMultipartUpload" and calls.count("UploadPart") >= 3
    for headers in part_headers:  # every part carries its SHA-256, as a header or a trailer
        assert "x-amz-checksum-sha256" in headers or "sha256" in headers.get("x-amz-trailer", "")
    assert "CompleteMultipartUpload" in calls


def test_server_side_encryption_is_requested(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region,
                          access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key,
                          server_side_encryption="AES256")
    sent: list[dict[str, str]] = []
    store.client.meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_: sent.append({k: v.decode() if isinstance(v, bytes) else v
                                          for k, v in request.headers.items()}))
    store.put("studies/enc.dcm", b"secret pixels")
    assert sent[0]["x-amz-server-side-encryption"] == "AES256"
    assert "x-amz-checksum-sha256" in sent[0] and "Content-MD5" in sent[0]
    assert store.get("studies/enc.dcm") == b"secret pixels"


def test_a_real_s3_server_is_checked_to_honour_conditional_writes(seaweedfs: SeaweedFS,
                                                                  s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region,
                          access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key)
    store.check_write_once()  # SeaweedFS refuses the second create
    assert list(store.list(".write-once-probe/")) == []  # the probe leaves nothing

    class IgnoringConditions(S3ObjectStore):
        """How an older S3-compatible server behaves: If-None-Match ignored."""

        def create(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
            self.put(key, body, content_type=content_type)

    ignoring = IgnoringConditions(s3_bucket, endpoint_url=seaweedfs.endpoint_url,
                                  region=seaweedfs.region, access_key=seaweedfs.access_key,
                                  secret_key=seaweedfs.secret_key)
    with pytest.raises(StorageError, match="ignores conditional writes"):
        ignoring.check_write_once()
    assert list(ignoring.list(".write-once-probe/")) == []
