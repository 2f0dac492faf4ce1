"""Thin Celery tasks: identifiers in, identifiers out; the logic lives in plain modules."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init
from sqlalchemy.exc import SQLAlchemyError

from spool import BatchClaim, record_retry, record_started
from spool.claims import clear_pending
from storage import StorageError
from worker.completion import StudyCompletion
from worker.events import Webhook, WebhookDeliveryError, deliver
from worker.pipeline import IngestPipeline, TransientPipelineError
from worker.recovery import completion_job_dir

log = logging.getLogger(__name__)

INGEST_TASK = "dicom_gateway.ingest_spool_batch"
COMPLETE_STUDY_TASK = "dicom_gateway.complete_studies"
WEBHOOK_TASK = "dicom_gateway.deliver_webhook"


def ingest_queue(site_id: str) -> str:
    """The queue of one site's work."""
    return f"ingest.{site_id}"


@dataclass
class WorkerContext:
    """What a worker process needs, built after the fork by the composition root."""

    pipeline: IngestPipeline
    completion: StudyCompletion
    site_id: str
    quiet_seconds: float = 60.0
    webhooks: tuple[Webhook, ...] = ()


class _ContextHolder:
    """One context per worker process, built lazily (engines and clients don't survive a fork)."""

    def __init__(self, factory: Callable[[], WorkerContext] | None) -> None:
        self.factory = factory
        self._context: WorkerContext | None = None
        self._lock = threading.Lock()

    def reset(self, **_kwargs: Any) -> None:
        self._context = None

    def get(self) -> WorkerContext:
        if self.factory is None:
            raise RuntimeError("this Celery app was built without a worker context (sender only)")
        with self._lock:
            if self._context is None:
                self._context = self.factory()
            return self._context


def register_tasks(app: Celery, context_factory: Callable[[], WorkerContext] | None) -> None:
    """Bind the gateway's tasks to `app`."""
    holder = _ContextHolder(context_factory)
    worker_process_init.connect(holder.reset, weak=False)

    @app.task(  # type: ignore[untyped-decorator]
        name=INGEST_TASK,
        bind=True,
        acks_late=True,
        # A pool process lost mid-task: the message is not put back (one copy per crash
        # of a poison batch); the recovery loop sends the batch again, counting deaths.
        reject_on_worker_lost=False,
    )
    def ingest_spool_batch(self: Task, site_id: str, batch_id: str) -> dict[str, Any]:
        """Process one batch. A failure of the index or object store is recorded in the
        batch (`spool.recovery`) and the task ends: the recovery loop sends it again once
        they answer — no retry waits in a worker's memory or in the broker."""
        context = holder.get()
        try:
            report = context.pipeline.ingest_batch(site_id, batch_id)
        except TransientPipelineError as exc:
            log.warning("batch %s/%s waits for a retry (%s)", site_id, batch_id, exc.reason)
            return {"retry": exc.reason}
        return {
            "stored": report.stored,
            "quarantined": report.quarantined,
            "missing": report.missing,
        }

    @app.task(  # type: ignore[untyped-decorator]
        name=COMPLETE_STUDY_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=False,  # as for ingest: the recovery loop sends it again
    )
    def complete_studies(self: Task, site_id: str = "") -> list[str]:
        """Complete the due studies of this worker's sites, under the completion job's
        claim (one run at a time across the site's workers); a failure of the index or
        object store is recorded for the recovery loop, as for a batch."""
        context = holder.get()

        def send(number: int, event_type: str, delivery_id: str, body: bytes) -> None:
            app.send_task(
                WEBHOOK_TASK,
                args=[number, event_type, delivery_id, body.decode()],
                queue=ingest_queue(context.site_id),
            )

        context.completion.deliver = send
        directory = completion_job_dir(context.pipeline.spool_root, site_id or context.site_id)
        claim = BatchClaim.acquire(directory, wait=True, create=True)
        if claim is None:  # pragma: no cover - created above
            return []
        with claim:
            previous = record_started(directory)
            try:
                done = context.completion.run(context.quiet_seconds)
            except (StorageError, SQLAlchemyError) as exc:  # store/index trouble: retried
                record_retry(directory, previous, type(exc).__name__)
                log.warning("study completion waits for a retry (%s)", type(exc).__name__)
                return []
            except Exception as exc:
                record_retry(directory, previous, type(exc).__name__)
                raise
            clear_pending(directory)
            return done

    @app.task(  # type: ignore[untyped-decorator]
        name=WEBHOOK_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(WebhookDeliveryError,),
        retry_backoff=2,
        retry_backoff_max=600,
        retry_jitter=True,
        max_retries=12,
    )
    def deliver_webhook(
        self: Task, number: int, event_type: str, delivery_id: str, body: str
    ) -> int:
        context = holder.get()
        return deliver(context.webhooks[number], event_type, delivery_id, body.encode())


def enqueue_ingest(app: Celery, site_id: str, batch_id: str) -> None:
    """Send one ingest task for a spool batch (used by the node and the sweeper)."""
    app.send_task(INGEST_TASK, args=[site_id, batch_id], queue=ingest_queue(site_id))


def enqueue_completion(app: Celery, site_id: str) -> None:
    """Ask a worker of the site to complete its studies that are due (sent by the recovery
    loop when the index has one, and no completion task of the site is outstanding)."""
    app.send_task(COMPLETE_STUDY_TASK, args=[site_id], queue=ingest_queue(site_id))
