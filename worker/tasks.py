"""Thin Celery tasks: identifiers in, identifiers out; the logic lives in pipeline.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init

from worker.pipeline import IngestPipeline, TransientPipelineError

INGEST_TASK = "dicom_gateway.ingest_spool_batch"
INGEST_QUEUE = "ingest"


class _PipelineHolder:
    """One pipeline per worker process, built after the fork (engines don't survive a fork)."""

    def __init__(self, factory: Callable[[], IngestPipeline] | None) -> None:
        self.factory = factory
        self._pipeline: IngestPipeline | None = None
        self._lock = threading.Lock()

    def reset(self, **_kwargs: Any) -> None:
        self._pipeline = None

    def get(self) -> IngestPipeline:
        if self.factory is None:
            raise RuntimeError("this Celery app was built without a pipeline (sender only)")
        with self._lock:
            if self._pipeline is None:
                self._pipeline = self.factory()
            return self._pipeline


def register_tasks(app: Celery, pipeline_factory: Callable[[], IngestPipeline] | None) -> None:
    """Bind the gateway's tasks to `app`."""
    holder = _PipelineHolder(pipeline_factory)
    worker_process_init.connect(holder.reset, weak=False)

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
        report = holder.get().ingest_batch(site_id, batch_id)
        return {"stored": report.stored, "quarantined": report.quarantined, "missing": report.missing}


def enqueue_ingest(app: Celery, site_id: str, batch_id: str) -> None:
    """Send one ingest task for a spool batch (used by the node and the sweeper)."""
    app.send_task(INGEST_TASK, args=[site_id, batch_id], queue=INGEST_QUEUE)
