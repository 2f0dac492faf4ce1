"""The Celery application, built from explicit arguments (never from the environment)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from spool.batches import private_directory
from worker.broker import TRANSPORT as ATOMIC_FILESYSTEM_TRANSPORT
from worker.tasks import (
    COMPLETE_STUDY_TASK,
    INGEST_TASK,
    WEBHOOK_TASK,
    WorkerContext,
    ingest_queue,
    register_tasks,
)


def filesystem_broker_options(folder: Path, polling_interval: float = 0.05) -> dict[str, Any]:
    """Transport options of kombu's `filesystem://` broker for the embedded mode.

    The default polling interval (1 s) adds about a second to every task; 50 ms keeps
    latency low at a negligible idle cost.
    """
    queue_dir = folder / "queue"
    processed = folder / "processed"
    control = folder / "control"  # exchange tables; kombu's default is ./control (the cwd)
    # Messages name spool batches and kombu's own files sit beside them: owner only (0700).
    for path in (folder, queue_dir, processed, control):
        private_directory(path)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "store_processed": False,
        "polling_interval": polling_interval,
    }


def create_celery_app(
    broker_url: str,
    *,
    site_id: str,
    transport_options: dict[str, Any] | None = None,
    context_factory: Callable[[], WorkerContext] | None = None,
) -> Celery:
    """A Celery app with the gateway's tasks; `context_factory` is needed only by workers.

    Each site has its own queue (`ingest.<site>`): a site's worker reads that site's spool.
    """
    queue = ingest_queue(site_id)
    app = Celery("dicom_gateway", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue=queue,
        task_routes={
            name: {"queue": queue} for name in (INGEST_TASK, COMPLETE_STUDY_TASK, WEBHOOK_TASK)
        },
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options or {},
        # kombu's own filesystem transport can lose a message to a polling consumer.
        broker_transport=(
            ATOMIC_FILESYSTEM_TRANSPORT if broker_url.startswith("filesystem:") else None
        ),
        task_serializer="json",
        accept_content=["json"],
        enable_utc=True,
    )
    register_tasks(app, context_factory)
    return app
