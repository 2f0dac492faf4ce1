"""The worker's recovery loop: every acknowledged instance processed, every due study
completed, whatever died or restarted meanwhile.

One loop runs in each worker's main process (any number of workers, on any host that
reads the site's spool). Every `interval` seconds it looks at the facts — the broker's
identity (a Redis run id changes when Redis restarts, and its queues may be gone), whether
the index and the object store answer, which batches are claimed, which worker processes
are alive — and sends again the batches and the completion step whose task is gone
(`spool.recovery`). Nothing waits for an idle threshold: a batch whose worker was killed
is sent again at the next pass, a batch refused while the broker was down at the first pass
after it is back.

The completion step is a job like a batch, in `<spool>/.completion/<site>/`: needed
while the index has a study due (`completion_due_at`, set when an instance is indexed;
cleared when the study is completed for that content), with the same claim and record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spool import Facts, ProcessMark, Spool, SweepReport, sweep
from spool.claims import PendingRecord, read_pending, write_reserved
from spool.recovery import consider

log = logging.getLogger(__name__)

#: The kind of process mark a worker's main process holds (STOW-RS looks for one).
WORKER_MARK = "worker"


def completion_job_dir(spool_root: Path, site_id: str) -> Path:
    """The folder of a site's completion job (claim and record)."""
    return spool_root / ".completion" / site_id


class BrokerEpoch:
    """The broker's identity (`broker_epoch`), read at most once per `ttl` seconds. A
    sender reads it *before* sending and records it with the batch: read after, it could
    name a restarted broker that never got the message."""

    def __init__(self, app: Any, ttl: float = 1.0) -> None:
        self.app, self.ttl = app, ttl
        self._value: str | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._read_at >= self.ttl:
                self._value = broker_epoch(self.app)
                self._read_at = now
            return self._value


@dataclass
class RecoveryLoop:
    """See the module docstring. `send_batch(site, batch)` and `send_completion()` hand a
    task to the broker (raising when it is down); `dependencies()` raises while the index
    or the object store does not answer; `completion_due()` says whether a study of this
    worker's sites is due."""

    spools: Sequence[Spool]
    send_batch: Callable[[str, str], None]
    send_completion: Callable[[], None]
    completion_due: Callable[[], bool]
    dependencies: Callable[[], None]
    #: The broker's identity now (raises when the broker does not answer).
    broker: Callable[[], str]
    #: The spool folder of the worker's sites (their batches, marks, completion jobs).
    spool_root: Path
    #: The site whose queue the completion tasks go to (`completion_job_dir`).
    site_id: str
    interval: float = 2.0
    _dependencies_up: bool = True

    def tick(self) -> bool:
        """One pass; False when the broker did not answer (nothing could be sent)."""
        try:
            epoch = self.broker()
        except Exception as exc:  # noqa: BLE001 - any failure means: not reachable now
            log.debug("broker not reachable (%s)", type(exc).__name__)
            return False
        try:
            self.dependencies()
            up = True
        except Exception as exc:  # noqa: BLE001 - any failure: retries wait
            log.debug("index or object store not answering (%s)", type(exc).__name__)
            up = False
        facts = Facts(
            queue_alive=lambda sent_to: sent_to == epoch,
            dependencies_up=up,
            dependencies_returned=up and not self._dependencies_up,
        )
        self._dependencies_up = up
        for spool in self.spools:

            def send(batch_id: str, site_id: str = spool.site_id) -> str:
                self.send_batch(site_id, batch_id)
                return epoch  # read before sending

            sweep(spool, send, facts)
        if up:
            try:
                due = self.completion_due()
            except Exception as exc:  # noqa: BLE001 - the index went away meanwhile
                log.debug("completion not looked at (%s)", type(exc).__name__)
                return True

            def send_completion(_name: str) -> str:
                self.send_completion()
                return epoch

            consider(
                completion_job_dir(self.spool_root, self.site_id),
                send_completion,
                facts,
                SweepReport(),
                alive=lambda name: ProcessMark.alive(self.spool_root, name),
                needed=due,
            )
        return True

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                log.error("recovery pass failed (%s)", type(exc).__name__)
            stopping.wait(self.interval)

    def start(self) -> threading.Event:
        """Run in a daemon thread; set the returned event to stop it."""
        stopping = threading.Event()
        threading.Thread(target=self.run, args=(stopping,), name="recovery", daemon=True).start()
        return stopping


def broker_epoch(app: Any) -> str:
    """The broker's identity: Redis's run id (new at each start: what was queued in memory
    may be gone); "" for brokers that keep their queues (RabbitMQ's durable queues, the
    embedded file-system broker). Raises when the broker does not answer."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
        if connection.transport.driver_type != "redis":
            return ""
        info = connection.default_channel.client.info("server")
        return str(info.get("run_id", ""))


def record_reserved(directory: Path, mark: str) -> None:
    """A worker process took the task of `directory` from the broker (before running it):
    recorded apart (`.reserved`, written without the claim, which a writer may still
    hold), so that its death is seen even before the task starts."""
    if not directory.is_dir():
        return
    sent = read_pending(directory)
    try:
        write_reserved(
            directory,
            PendingRecord("reserved", time.time(), by=mark, epoch=sent.epoch if sent else ""),
        )
    except OSError:
        pass  # processed and removed meanwhile


def task_directory(spool_root: Path, task_name: str, args: Sequence[Any]) -> Path | None:
    """The job folder a gateway task works on, from its name and arguments."""
    from worker.tasks import COMPLETE_STUDY_TASK, INGEST_TASK

    if task_name == INGEST_TASK and len(args) >= 2:
        site, batch = str(args[0]), str(args[1])
        if "/" in site or "/" in batch or site.startswith(".") or batch.startswith("."):
            return None
        return spool_root / site / batch
    if task_name == COMPLETE_STUDY_TASK and args:
        site = str(args[0])
        return None if "/" in site or site.startswith(".") else completion_job_dir(spool_root, site)
    return None
