"""Finding the spool batches whose task can no longer exist, and handing them over again.

Every writer hands a batch to the worker under the batch's claim and records it (`queued`);
every worker takes the claim before processing and records what it did (see
`spool.claims`). A batch that holds instances, whose claim is free, is then in one of these
cases, each decided from a fact rather than from how long it has been idle:

| record | the task | sent again |
|---|---|---|
| none | never sent: its writer died, or the broker was down | now |
| `queued` | in the broker | when the broker's identity changed since (a restarted Redis: its queue may be gone) |
| `queued` + `.reserved` | taken by a worker process (or `import`'s own) | when that process's mark is free (it died), or the broker's identity changed |
| `started` | was being processed | now, the first time: the claim is free, so the process that started it died; after a second death, with a growing wait (it may be what kills them) |
| `retry` | failed on something else (index, object store) | once that is seen answering again, or at the retry time |

Sending records `queued` again, so one batch has one live task whatever the length of an
outage: a batch is sent again only when a fact says its task is gone. A task that comes
back after all (a broker that kept its queue) finds the batch processed, or claimed and
waits for it: processing twice stores nothing twice (the pipeline skips stored instances).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spool.batches import SPOOL_SUFFIX, Spool
from spool.claims import (
    BatchClaim,
    PendingRecord,
    ProcessMark,
    clear_reserved,
    read_pending,
    read_reserved,
    write_pending,
)

log = logging.getLogger(__name__)

#: An empty batch folder (its instances processed, a marker left) is removed after this.
EMPTY_FOLDER_SECONDS = 60.0


@dataclass(frozen=True)
class Facts:
    """What the sweeper saw this time round."""

    #: Whether the queue a record was sent to (its `PendingRecord.epoch`) still holds what
    #: it was given: for Redis, the run id is the current one; for a process's own queue,
    #: that process is alive. None: assumed (a broker that keeps its queues).
    queue_alive: Callable[[str], bool] | None = None
    #: The index and object store answer now (a `retry` waits while they do not).
    dependencies_up: bool = True
    #: ... and did not at the previous look: every waiting `retry` goes now.
    dependencies_returned: bool = False


@dataclass
class SweepReport:
    """One pass over one spool: batches sent again, by reason, and what was left alone."""

    sent: Counter[str] = field(default_factory=Counter)
    #: handed over and outstanding (queued or reserved by a live worker)
    outstanding: int = 0
    #: claimed now (being written or processed)
    busy: int = 0
    #: waiting to be tried again (`retry` not due, or what failed is still down)
    waiting: int = 0
    removed: int = 0

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


def lost_reason(
    record: PendingRecord | None,
    facts: Facts,
    alive: Callable[[str], bool],
    now: float,
    reserved: PendingRecord | None = None,
) -> str | None:
    """Why an unclaimed batch holding instances must be sent again, or None (its task
    exists, or it must wait). `reserved`: who took its task since it was last sent
    (`.reserved`: a worker's main process, or `import` for its own batches)."""
    if record is None or record.state == "queued":
        if reserved is not None:
            if not alive(reserved.by):
                return "worker died"
            # taken from a broker that restarted since: sent again (a copy is harmless)
            if reserved.epoch and facts.queue_alive is not None:
                return None if facts.queue_alive(reserved.epoch) else "broker restarted"
            return None
        if record is None:
            return "never sent"
        if facts.queue_alive is not None and not facts.queue_alive(record.epoch):
            return "broker restarted"
        return None
    if record.state == "started":
        return "worker died"
    if not facts.dependencies_up:
        return None
    if facts.dependencies_returned or now >= record.retry_at:
        return "retry"
    return None


#: Hands one batch (by id) to whoever processes it and returns the broker's identity as
#: read before sending; raises when it cannot (broker down).
Send = Callable[[str], str | None]


def hand_over(directory: Path, send: Send, previous: PendingRecord | None = None) -> None:
    """Send the job in `directory` (its claim held by the caller) and record it queued,
    with the broker's identity `send` returns. Raises what `send` raises (the record then
    left as it was). A record that cannot be written (a full disk) is logged: the task is
    sent, and may be sent again by a later pass (a copy is harmless)."""
    clear_reserved(directory)  # whoever took an earlier task of it: this one is newer
    epoch = send(directory.name) or ""
    base = previous or PendingRecord("queued", time.time())
    try:
        write_pending(directory, base.evolve("queued", by="", retry_at=0.0, reason="", epoch=epoch))
    except OSError as exc:
        log.error("%s sent, its record not written (%s)", directory.name, type(exc).__name__)


def _holds_instances(directory: Path) -> tuple[bool, bool]:
    """(has instances, has a write in progress)."""
    instances = partial = False
    for entry in directory.iterdir():
        if entry.name.endswith(SPOOL_SUFFIX) and not entry.name.startswith("."):
            instances = True
        elif entry.name.endswith(".part"):
            partial = True
    return instances, partial


def _remove_empty(directory: Path, now: float) -> bool:
    """Remove a batch folder left with markers only, once it has been so for a while."""
    try:
        if now - directory.stat().st_mtime < EMPTY_FOLDER_SECONDS:
            return False
        for leftover in directory.iterdir():
            if leftover.name.startswith("."):
                leftover.unlink(missing_ok=True)
        directory.rmdir()
        return True
    except OSError:
        return False


def consider(
    directory: Path,
    send: Send,
    facts: Facts,
    report: SweepReport,
    *,
    alive: Callable[[str], bool],
    needed: bool | None = None,
) -> bool:
    """Decide on one job folder (a batch; or a folder whose work is `needed`, as the
    completion step's): send it again if its task is gone. False when a send failed."""
    claim = BatchClaim.acquire(directory, wait=False, create=needed is not None)
    if claim is None:
        if directory.exists():
            report.busy += 1
        return True
    with claim:
        now = time.time()
        if needed is None:
            try:
                instances, partial = _holds_instances(directory)
            except OSError:
                return True  # removed meanwhile
            if not instances:
                if not partial and _remove_empty(directory, now):
                    report.removed += 1
                return True
        elif not needed:
            return True
        record = read_pending(directory)
        reason = lost_reason(record, facts, alive, now, read_reserved(directory))
        if reason is None:
            if record is not None and record.state == "retry":
                report.waiting += 1
            else:
                report.outstanding += 1
            return True
        if reason == "worker died" and record is not None and record.state == "started":
            # A worker died processing it. Once: sent again now. Again: it may be what
            # kills them (a poison batch), so each further attempt waits longer.
            if record.attempts >= 1:
                record_retry(directory, record, "worker died")
                report.waiting += 1
                log.error(
                    "%s: a worker died processing it %d times; next attempt delayed",
                    directory.name,
                    record.attempts + 1,
                )
                return True
            record = record.evolve("started", attempts=record.attempts + 1)
        try:
            hand_over(directory, send, record)
        except Exception as exc:  # noqa: BLE001 - the broker is down: the next pass tries
            log.warning("%s not sent again (%s); next pass", directory.name, type(exc).__name__)
            return False
        report.sent[reason] += 1
        return True


def sweep(
    spool: Spool,
    send: Send,
    facts: Facts,
    *,
    alive: Callable[[str], bool] | None = None,
) -> SweepReport:
    """One pass over `spool`'s batches: send again those whose task is gone (see the module
    docstring). Stops at the first failed send (the broker is down: the next pass tries)."""
    report = SweepReport()
    root = spool.root

    def process_alive(name: str) -> bool:
        return ProcessMark.alive(root, name)

    try:
        folders = sorted(p for p in spool.site_dir.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return report
    for directory in folders:
        if not consider(directory, send, facts, report, alive=alive or process_alive):
            break
    if report.total_sent:
        log.info(
            "spool %s: %d batches sent again (%s)",
            spool.site_id,
            report.total_sent,
            ", ".join(f"{reason}: {n}" for reason, n in sorted(report.sent.items())),
        )
    return report


def record_started(directory: Path) -> PendingRecord | None:
    """A worker took the batch's claim and starts: recorded (with the mark of the process
    that took the task, for the logs), so that its death is seen. Returns the record it
    replaced. A record that cannot be written (a full disk) is
    logged and the work goes on: were this worker to die, the batch would wait for its
    broker's redelivery instead of the next pass."""
    previous = read_pending(directory)
    base = previous or PendingRecord("started", time.time())
    taken_by = read_reserved(directory)  # the worker process that took the task, if known
    try:
        write_pending(
            directory, base.evolve("started", retry_at=0.0, by=taken_by.by if taken_by else "")
        )
        clear_reserved(directory)
    except OSError as exc:
        log.error("%s: start not recorded (%s)", directory.name, type(exc).__name__)
    return previous


#: Waits between attempts of a batch that fails on something else while that answers.
RETRY_BACKOFF_SECONDS = (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)


def record_retry(directory: Path, previous: PendingRecord | None, reason: str) -> PendingRecord:
    """The attempt failed on something that is not the batch's fault: try again later."""
    attempts = (previous.attempts if previous else 0) + 1
    delay = RETRY_BACKOFF_SECONDS[min(attempts, len(RETRY_BACKOFF_SECONDS)) - 1]
    now = time.time()
    record = PendingRecord("retry", now, retry_at=now + delay, attempts=attempts, reason=reason)
    with contextlib.suppress(FileNotFoundError):
        write_pending(directory, record)
    return record


#: Every state `batch_states` reports, present at zero.
BATCH_STATES = ("unsent", "queued", "reserved", "started", "retry")


def batch_states(spool: Spool) -> Counter[str]:
    """Batches holding instances by their record's state (`unsent`: none), without taking
    their claims (a batch being written or processed counts under its last record)."""
    counts: Counter[str] = Counter(dict.fromkeys(BATCH_STATES, 0))
    try:
        folders = [p for p in spool.site_dir.iterdir() if not p.name.startswith(".")]
    except FileNotFoundError:
        return counts
    for directory in folders:
        try:
            if not _holds_instances(directory)[0]:
                continue
        except OSError:
            continue
        record = read_pending(directory)
        if (record is None or record.state == "queued") and read_reserved(directory):
            counts["reserved"] += 1
        else:
            counts[record.state if record is not None else "unsent"] += 1
    return counts
