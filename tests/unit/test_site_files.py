"""Each writer of identified data at a site creates it owner-only (files 0600, folders
0700) under umask 022: the spool, the embedded broker's messages, STOW-RS parts while they
arrive; and `close_private_tree` tightens what an older version left wider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.files import file_mode
from web_viewer_api.dicomweb.stow import receive_parts
from worker import Spool, close_private_tree
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
