"""Each writer of identified data at a site creates it owner-only (files 0600, folders
0700) under umask 022: the spool, the embedded broker's messages, STOW-RS parts while they
arrive; and `close_private_tree` tightens what an older version left wider."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from spool import Spool, close_private_tree, incoming_dir
from tests.support.files import file_mode
from web_viewer_api.dicomweb.stow import receive_parts
from worker.broker import _write_message

pytestmark = pytest.mark.usefixtures("umask_022")


def test_a_spooled_instance_and_its_folders_are_owner_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data" / "spool", "site1")
    written = spool.write("batch-1", "1.2.3.4", b"\0" * 128 + b"DICM")
    assert file_mode(written) == 0o600
    for folder in (written.parent, spool.site_dir, spool.root, spool.root.parent):
        assert file_mode(folder) == 0o700, folder
    source = tmp_path / "received.dcm"
    source.write_bytes(b"\0" * 128 + b"DICM")
    assert file_mode(spool.write_file("batch-1", "1.2.3.5", source)) == 0o600


def test_a_received_file_is_moved_into_the_spool_or_copied_across_file_systems(
        tmp_path: Path) -> None:
    """STOW-RS parts arrive in the spool's incoming folder: moved into their batch, their
    bytes are written once. A file on another file system (/dev/shm, a tmpfs) is copied,
    durably, and left to its writer."""
    spool = Spool(tmp_path / "spool", "site1")
    incoming = incoming_dir(spool.root)
    incoming.mkdir(parents=True)
    part = incoming / ".stow-1.part"
    part.write_bytes(b"\0" * 128 + b"DICM" + b"1" * 1000)
    inode = part.stat().st_ino
    moved = spool.move_file("batch-1", "1.2.3.6", part)
    assert not part.exists() and moved.stat().st_ino == inode
    assert moved.read_bytes().endswith(b"1" * 1000) and file_mode(moved) == 0o600
    with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".dcm") as elsewhere:
        elsewhere.write(b"\0" * 128 + b"DICM" + b"2" * 1000)
        elsewhere.flush()
        copied = spool.move_file("batch-1", "1.2.3.7", Path(elsewhere.name))
        assert Path(elsewhere.name).exists() and copied.stat().st_ino != os.stat(elsewhere.name).st_ino
    assert copied.read_bytes().endswith(b"2" * 1000) and file_mode(copied) == 0o600
    with pytest.raises(ValueError):
        spool.move_file("batch-1", "not a uid", moved)


def test_a_broker_message_is_owner_only(tmp_path: Path) -> None:
    _write_message(str(tmp_path), "1_x.ingest.site1.msg", {"body": "batch"})
    assert file_mode(tmp_path / "1_x.ingest.site1.msg") == 0o600


def test_stow_parts_are_written_owner_only_as_they_arrive(tmp_path: Path) -> None:
    folder = tmp_path / "spool" / ".incoming"
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 1000 + b"\r\n--b--\r\n")

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    parts = asyncio.run(receive_parts(chunks(), b"b", folder, 1 << 20))
    assert len(parts) == 1 and file_mode(parts[0].path) == 0o600
    assert file_mode(folder) == 0o700


def test_close_private_tree_tightens_older_files_and_leaves_links(tmp_path: Path) -> None:
    root = tmp_path / "quarantine"
    (root / "site1" / "b1").mkdir(parents=True)
    (root / "site1" / "b1" / "1.2.3.dcm").write_bytes(b"x")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"y")
    (root / "link").symlink_to(outside)
    assert close_private_tree(root) == 4
    assert {file_mode(p) for p in (root, root / "site1", root / "site1" / "b1")} == {0o700}
    assert file_mode(root / "site1" / "b1" / "1.2.3.dcm") == 0o600
    assert file_mode(outside) == 0o644  # a link's target is not ours to change
    assert close_private_tree(root) == 0
