"""The spool's disk fills up (a real 3 MB tmpfs): the node answers 0xA700 Out of Resources
for what it cannot keep, keeps what it acknowledged, and accepts again once space returns."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node import CallerPolicy, DicomNode, NodeConfig
from tests.support.services import free_port


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "spool"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (make test runs as root on the CI machines)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_spool_answers_out_of_resources_and_recovers(small_disk: Path, dcmtk: dict[str, str],
                                                          sample_study: tuple[Path, object]) -> None:
    files = sorted(sample_study[0].rglob("*.dcm"))[:8]  # 8 CT of 512 KB: more than 3 MB
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=small_disk, policy=CallerPolicy.build(["127.0.0.0/8"]))
    node = DicomNode(config, lambda site, batch: None)
    node.start()
    try:
        sent = subprocess.run([dcmtk["storescu"], "-v", "-aec", "DICOMGATEWAY", "127.0.0.1",
                               str(config.port), *map(str, files)], capture_output=True, text=True, timeout=60)
        log = sent.stdout + sent.stderr
        acknowledged = len(re.findall(r"Received Store Response \(Success\)", log))
        assert "OutOfResources" in log or "0xa700" in log.lower(), log[-800:]
        assert 0 < acknowledged < len(files)
        kept = sorted(node.spool.site_dir.glob("*/*.dcm"))
        assert len(kept) == acknowledged
        for path in kept:
            pydicom.dcmread(path)  # every acknowledged instance is whole
        assert not list(node.spool.site_dir.glob("*/.*.part"))  # no half-written leftovers
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        again = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1", str(config.port),
                                *map(str, files)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert len({p.name for p in node.spool.site_dir.glob("*/*.dcm")}) == len(files)
    finally:
        node.stop()
