"""The node's flow control on a real spool folder: what it counts, when it holds an answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.backlog import SpoolBacklog
from spool import Spool, incoming_dir
from tests.support.services import wait_for


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


@contextmanager
def _draining(backlog: SpoolBacklog, files: list[Path]) -> Iterator[None]:
    """The backlog counted in its thread while a slow worker removes one file every 50 ms;
    entered once the counter has seen the worker drain."""
    stopping = threading.Event()

    def worker() -> None:
        for path in files:
            if stopping.is_set():
                return
            path.unlink()
            time.sleep(0.05)

    threads = [threading.Thread(target=backlog.run, args=(stopping,), daemon=True),
               threading.Thread(target=worker, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        wait_for(backlog.draining, timeout=5, interval=0.01, what="the drain to be seen")
        yield
    finally:
        stopping.set()
        for thread in threads:
            thread.join(timeout=5)


def test_an_answer_waits_until_the_worker_brings_the_backlog_under_the_limit(
        tmp_path: Path) -> None:
    files = _spool_files(tmp_path / "spool", "site1", "batch-a", 12)
    backlog = SpoolBacklog(tmp_path / "spool", limit=4, max_hold_seconds=30, interval=0.05)
    with _draining(backlog, files):
        held = backlog.hold()
        left = sum(1 for path in files if path.exists())
    assert held > 0.1
    assert left <= 4  # released once the count it saw was back under the limit


def test_a_hold_never_exceeds_its_bound(tmp_path: Path) -> None:
    files = _spool_files(tmp_path / "spool", "site1", "batch-a", 40)
    backlog = SpoolBacklog(tmp_path / "spool", limit=1, max_hold_seconds=0.3, interval=0.05)
    with _draining(backlog, files):
        started = time.monotonic()
        held = backlog.hold()
        elapsed = time.monotonic() - started
    assert 0.25 <= held < 1.0 and elapsed < 1.0
