"""Claims, pending records and the sweep: a batch is sent again when a fact says its task is
gone (its holder died, its broker restarted, what failed is back), never because it idled;
and sent once, whatever the number of passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spool import BatchClaim, Facts, PendingRecord, ProcessMark, Spool, batch_states, sweep
from spool.claims import read_pending, write_pending, write_reserved
from spool.recovery import EMPTY_FOLDER_SECONDS, hand_over, record_retry, record_started
from tests.support.services import wait_for

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def _batch(spool: Spool, name: str, instances: int = 2) -> Path:
    directory = spool.site_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(instances):
        (directory / f"1.2.3.{number}.dcm").write_bytes(b"DICM")
    return directory


def _holder(path: Path) -> subprocess.Popen[str]:
    """Another process holding an exclusive flock on `path` (as a node or worker would)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def _mark_holder(spool: Spool, kind: str) -> tuple[subprocess.Popen[str], str]:
    """Another process holding a `ProcessMark` of `kind` on the spool; and its name."""
    process = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from spool import ProcessMark; "
         "m = ProcessMark(Path(sys.argv[1]), sys.argv[2]); print(m.name, flush=True); "
         "time.sleep(600)", str(spool.root), kind],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


class Sent:
    """A broker: records what it is sent and answers with its identity (`epoch`)."""

    def __init__(self, epoch: str = "redis-run-1") -> None:
        self.epoch, self.batches, self.down = epoch, [], False

    def __call__(self, batch_id: str) -> str:
        if self.down:
            raise ConnectionError("broker down")
        self.batches.append(batch_id)
        return self.epoch

    def facts(self, **kwargs: object) -> Facts:
        return Facts(queue_alive=lambda sent_to: sent_to == self.epoch, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", "site1")


def test_a_claim_held_by_another_process_is_free_the_moment_it_is_killed(spool: Spool) -> None:
    directory = _batch(spool, "b1")
    holder = _holder(directory / ".claim")
    try:
        assert BatchClaim.acquire(directory, wait=False) is None
        report = sweep(spool, Sent(), Sent().facts())
        assert report.busy == 1 and report.total_sent == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claim = BatchClaim.acquire(directory, wait=False)
    assert claim is not None
    claim.release()


def test_each_record_state_is_sent_again_only_on_its_fact(spool: Spool) -> None:
    broker = Sent("run-2")
    alive_mark = ProcessMark(spool.root, "worker")
    try:
        now = time.time()
        records = {
            "never-sent": None,
            "queued-here": PendingRecord("queued", now, epoch="run-2"),
            "queued-before-restart": PendingRecord("queued", now, epoch="run-1"),
            "reserved-by-live": PendingRecord("queued", now, epoch="run-2"),
            "reserved-by-dead": PendingRecord("queued", now, epoch="run-2"),
            "started": PendingRecord("started", now),
            "retry-due": PendingRecord("retry", now, retry_at=now - 1, attempts=1),
            "retry-later": PendingRecord("retry", now, retry_at=now + 600, attempts=3),
        }
        for name, record in records.items():
            directory = _batch(spool, name)
            if record is not None:
                write_pending(directory, record)
        # what a worker's main process writes when it takes a task from the broker
        write_reserved(spool.site_dir / "reserved-by-live",
                       PendingRecord("reserved", now, by=alive_mark.name, epoch="run-2"))
        write_reserved(spool.site_dir / "reserved-by-dead",
                       PendingRecord("reserved", now, by="worker-nohost-1", epoch="run-2"))
        report = sweep(spool, broker, broker.facts())
        assert sorted(broker.batches) == sorted([
            "never-sent", "queued-before-restart", "reserved-by-dead", "started", "retry-due"])
        assert report.sent == {"never sent": 1, "broker restarted": 1, "worker died": 2, "retry": 1}
        assert report.outstanding == 2 and report.waiting == 1
        for name in broker.batches:  # each recorded as sent to this broker
            record = read_pending(spool.site_dir / name)
            assert record is not None and record.state == "queued" and record.epoch == "run-2"
        assert read_pending(spool.site_dir / "retry-due").attempts == 1  # type: ignore[union-attr]
        # Any number of passes later: nothing is sent twice (one live task per batch).
        for _ in range(20):
            assert sweep(spool, broker, broker.facts()).total_sent == 0
        assert len(broker.batches) == 5
    finally:
        alive_mark.close()


def test_retries_wait_while_what_failed_is_down_and_go_the_moment_it_is_back(spool: Spool) -> None:
    broker = Sent()
    directory = _batch(spool, "b1")
    record = record_retry(directory, None, "EndpointConnectionError")
    assert record.state == "retry" and record.attempts == 1 and record.retry_at > time.time()
    write_pending(directory, PendingRecord("retry", time.time(), retry_at=time.time() - 5,
                                           attempts=7, reason="OperationalError"))
    for _ in range(10):  # however long the outage: not sent, no copy queued
        report = sweep(spool, broker, broker.facts(dependencies_up=False))
        assert report.waiting == 1 and report.total_sent == 0
    write_pending(directory, PendingRecord("retry", time.time(), retry_at=time.time() + 600,
                                           attempts=7, reason="OperationalError"))
    report = sweep(spool, broker, broker.facts(dependencies_up=True, dependencies_returned=True))
    assert broker.batches == ["b1"] and report.sent == {"retry": 1}
    assert read_pending(directory).attempts == 7  # type: ignore[union-attr]


def test_a_failed_send_leaves_the_record_and_the_next_pass_sends(spool: Spool) -> None:
    broker = Sent()
    directory = _batch(spool, "b1")
    _batch(spool, "b2")
    broker.down = True
    report = sweep(spool, broker, broker.facts())
    assert report.total_sent == 0 and read_pending(directory) is None
    broker.down = False
    assert sweep(spool, broker, broker.facts()).total_sent == 2


def test_a_batch_whose_writer_died_mid_write_is_sent_at_once(spool: Spool) -> None:
    directory = _batch(spool, "b1")
    writer = _holder(directory / ".claim")  # a node mid-association
    broker = Sent()
    assert sweep(spool, broker, broker.facts()).busy == 1
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert sweep(spool, broker, broker.facts()).sent == {"never sent": 1}


def test_a_reserving_process_that_dies_is_seen(spool: Spool, tmp_path: Path) -> None:
    mark_process, name = _mark_holder(spool, "worker")
    assert ProcessMark.alive(spool.root, name) and ProcessMark.any_alive(spool.root, "worker")
    directory = _batch(spool, "b1")
    write_pending(directory, PendingRecord("queued", time.time(), epoch="redis-run-1"))
    write_reserved(directory, PendingRecord("reserved", time.time(), by=name, epoch="redis-run-1"))
    broker = Sent()
    assert sweep(spool, broker, broker.facts()).outstanding == 1
    mark_process.send_signal(signal.SIGKILL)
    mark_process.wait()
    assert not ProcessMark.any_alive(spool.root, "worker")
    assert sweep(spool, broker, broker.facts()).sent == {"worker died": 1}


def test_a_worker_records_its_start_and_its_retry_without_any_value(spool: Spool) -> None:
    directory = _batch(spool, "b1")
    hand_over(directory, lambda name: "run-1")
    previous = record_started(directory)
    assert previous is not None and previous.state == "queued"
    assert read_pending(directory).state == "started"  # type: ignore[union-attr]
    record_retry(directory, previous, "S3UploadFailedError")
    stored = json.loads((directory / ".pending").read_text())
    assert stored["state"] == "retry" and stored["reason"] == "S3UploadFailedError"
    assert set(stored) == {"state", "at", "by", "retry_at", "attempts", "reason", "epoch"}
    assert oct((directory / ".pending").stat().st_mode & 0o777) == "0o600"


def test_empty_folders_are_removed_after_a_while_and_states_are_counted(spool: Spool) -> None:
    empty = spool.site_dir / "done"
    empty.mkdir(parents=True)
    (empty / ".claim").write_bytes(b"")
    old = time.time() - EMPTY_FOLDER_SECONDS - 5
    os.utime(empty, (old, old))
    write_pending(_batch(spool, "q"), PendingRecord("queued", time.time(), epoch="x"))
    _batch(spool, "u")
    assert batch_states(spool) == {"unsent": 1, "queued": 1, "reserved": 0, "started": 0,
                                   "retry": 0}
    report = sweep(spool, Sent("x"), Sent("x").facts())
    assert report.removed == 1 and not empty.exists()
    assert batch_states(spool)["queued"] == 2  # the unsent one was sent and recorded


def test_a_child_forked_while_a_claim_is_held_does_not_keep_it(spool: Spool) -> None:
    """A worker's pool forks a replacement child while the recovery loop holds a claim:
    the child closes its copy at the fork, so the claim ends when the parent lets go."""
    directory = _batch(spool, "b1")
    claim = BatchClaim.acquire(directory, wait=False)
    assert claim is not None
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child says it runs, sleeps, leaves uncleaned
        os.write(ready_write, b"x")  # (fork's handlers have run when fork returns here)
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"x"
        claim.release()
        again = BatchClaim.acquire(directory, wait=False)  # while the child still lives
        assert again is not None
        again.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_claim_removed_while_waited_for_is_no_claim(spool: Spool) -> None:
    """A late copy of a task waits for the worker that holds the batch; that worker empties
    and removes the folder: the waiter gets nothing (the batch is processed), not a lock on
    a deleted file."""
    import threading

    directory = _batch(spool, "b1")
    holder = BatchClaim.acquire(directory, wait=False)
    assert holder is not None
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(BatchClaim.acquire(directory, wait=True)))
    waiter.start()
    inode = (directory / ".claim").stat().st_ino

    def waiting() -> bool:  # the kernel lists a blocked flock request with "->"
        return any("->" in line and line.split()[-3].endswith(f":{inode}")
                   for line in Path("/proc/locks").read_text().splitlines())

    wait_for(waiting, timeout=10, interval=0.01, what="the waiter blocked on the claim")
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()
    holder.release()
    waiter.join(timeout=10)
    assert got == [None]


def test_a_batch_that_keeps_killing_workers_waits_longer_each_time(spool: Spool) -> None:
    broker = Sent()
    directory = _batch(spool, "poison")
    write_pending(directory, PendingRecord("started", time.time()))
    assert sweep(spool, broker, broker.facts()).sent == {"worker died": 1}  # once: at once
    assert read_pending(directory).attempts == 1  # type: ignore[union-attr]
    record_started(directory)  # taken again; its worker dies again
    report = sweep(spool, broker, broker.facts())
    assert report.total_sent == 0 and report.waiting == 1
    record = read_pending(directory)
    assert record is not None and record.state == "retry" and record.attempts == 2
    assert record.reason == "worker died" and record.retry_at > time.time()
    assert broker.batches == ["poison"]


def test_a_reservation_is_kept_apart_and_ends_with_its_process(spool: Spool) -> None:
    """`import`'s own batches (and a worker's reserved tasks) are left alone while the
    process that took them lives, whatever the broker; sent when it dies."""
    from spool.claims import read_reserved, write_reserved

    broker = Sent("redis-run-5")
    directory = _batch(spool, "imported")
    holder, name = _mark_holder(spool, "import")
    write_reserved(directory, PendingRecord("reserved", time.time(), by=name))
    for _ in range(3):
        assert sweep(spool, broker, broker.facts()).outstanding == 1
    assert batch_states(spool)["reserved"] == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert sweep(spool, broker, broker.facts()).sent == {"worker died": 1}
    assert read_reserved(directory) is None  # the new hand-over clears it
