"""The node's flow control on a real spool folder: what it counts, when it holds an answer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dicom_node.backlog import SpoolBacklog
from tests.support.services import wait_for
from worker import Spool, incoming_dir


def _spool_files(root: Path, site: str, batch: str, count: int) -> list[Path]:
    spool = Spool(root, site)
    return [spool.write(batch, f"1.2.3.{number}", b"\0" * 128 + b"DICM")
            for number in range(count)]


def test_the_backlog_counts_the_instances_of_every_site_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    _spool_files(root, "site1", "batch-a", 3)
    _spool_files(root, "site2", "batch-b", 2)
    (root / "site1" / "batch-a" / ".1.2.3.9.0123abcd.part").write_bytes(b"")  # being written
    incoming_dir(root).mkdir()
    (incoming_dir(root) / ".stow-1.part").write_bytes(b"")  # a STOW-RS part arriving
    (root / ".replies" / "site1").mkdir(parents=True)
    (root / ".replies" / "site1" / "batch-a.json").write_bytes(b"{}")
    backlog = SpoolBacklog(root, limit=10)
    backlog.recount()
    assert backlog.count == 5
    backlog.added()
    assert backlog.count + backlog._added == 6  # what the node spooled since the count


def test_no_hold_under_the_limit_or_while_nothing_drains(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    files = _spool_files(root, "site1", "batch-a", 5)
    backlog = SpoolBacklog(root, limit=2, max_hold_seconds=30)
    backlog.recount()
    started = time.monotonic()
    assert backlog.hold() < 0.5  # over the limit, but the worker has removed nothing
    assert time.monotonic() - started < 0.5
    files[0].unlink()  # the worker takes one out
    backlog.recount()
    assert backlog.draining()
    off = SpoolBacklog(root, limit=0, max_hold_seconds=30)
    off.recount()
    assert off.hold() == 0.0  # a limit of 0: flow control is off


def test_an_answer_waits_until_the_worker_brings_the_backlog_under_the_limit(
        tmp_path: Path) -> None:
    root = tmp_path / "spool"
    files = _spool_files(root, "site1", "batch-a", 12)
    backlog = SpoolBacklog(root, limit=4, max_hold_seconds=30, interval=0.05)
    stopping = threading.Event()
    counter = threading.Thread(target=backlog.run, args=(stopping,), daemon=True)
    counter.start()

    def worker() -> None:  # removes an instance every 50 ms, as a slow worker
        for path in files:
            path.unlink()
            time.sleep(0.05)

    drain = threading.Thread(target=worker, daemon=True)
    try:
        drain.start()
        wait_for(backlog.draining, timeout=5, interval=0.01, what="the drain to be seen")
        held = backlog.hold()
        left = sum(1 for path in files if path.exists())
        assert held > 0.1
        assert left <= 4  # released once the count it saw was back under the limit
    finally:
        stopping.set()
        drain.join(timeout=5)
        counter.join(timeout=5)


def test_a_hold_never_exceeds_its_bound(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    files = _spool_files(root, "site1", "batch-a", 40)
    backlog = SpoolBacklog(root, limit=1, max_hold_seconds=0.3, interval=0.05)
    stopping = threading.Event()
    counter = threading.Thread(target=backlog.run, args=(stopping,), daemon=True)
    counter.start()

    def worker() -> None:
        for path in files:
            path.unlink()
            time.sleep(0.05)

    drain = threading.Thread(target=worker, daemon=True)
    try:
        drain.start()
        wait_for(backlog.draining, timeout=5, interval=0.01, what="the drain to be seen")
        started = time.monotonic()
        held = backlog.hold()
        assert 0.25 <= held < 1.0 and time.monotonic() - started < 1.0
    finally:
        stopping.set()
        drain.join(timeout=5)
        counter.join(timeout=5)
