"""Thin Celery tasks: identifiers in, identifiers out; the logic lives in plain modules."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init

from worker.completion import StudyCompletion
from worker.events import Webhook, WebhookDeliveryError, deliver
from worker.pipeline import IngestPipeline, TransientPipelineError

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

    def schedule_completion(context: WorkerContext) -> None:
        app.send_task(
            COMPLETE_STUDY_TASK,
            queue=ingest_queue(context.site_id),
            countdown=context.quiet_seconds + 1,
        )

    @app.task(  # type: ignore[untyped-decorator]
        name=INGEST_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(TransientPipelineError,),
        retry_backoff=2,
        retry_backoff_max=300,
        retry_jitter=True,
        max_retries=20,
    )
    def ingest_spool_batch(self: Task, site_id: str, batch_id: str) -> dict[str, Any]:
        context = holder.get()
        report = context.pipeline.ingest_batch(site_id, batch_id)
        if report.stored:
            schedule_completion(context)
        return {
            "stored": report.stored,
            "quarantined": report.quarantined,
            "missing": report.missing,
        }

    @app.task(  # type: ignore[untyped-decorator]
        name=COMPLETE_STUDY_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(TransientPipelineError,),
        retry_backoff=5,
        retry_backoff_max=600,
        retry_jitter=True,
        max_retries=20,
    )
    def complete_studies(self: Task) -> list[str]:
        context = holder.get()

        def send(number: int, event_type: str, delivery_id: str, body: bytes) -> None:
            app.send_task(
                WEBHOOK_TASK,
                args=[number, event_type, delivery_id, body.decode()],
                queue=ingest_queue(context.site_id),
            )

        context.completion.deliver = send
        try:
            return context.completion.run(context.quiet_seconds)
        except Exception as exc:  # store/index trouble: try again later
            from sqlalchemy.exc import SQLAlchemyError

            from storage import StorageError

            if isinstance(exc, StorageError | SQLAlchemyError):
                raise TransientPipelineError(type(exc).__name__) from exc
            raise

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


def enqueue_completion(app: Celery, site_id: str, countdown: float = 0.0) -> None:
    """Ask a worker of the site to complete its studies that are due (at worker start; after
    a write-back at the region, once the study has been quiet: `countdown`)."""
    app.send_task(COMPLETE_STUDY_TASK, queue=ingest_queue(site_id), countdown=countdown or None)
