"""The worker: Celery app and tasks running the ingest pipeline (de-identify, store, index)."""

from worker.app import create_celery_app, filesystem_broker_options
from worker.pipeline import (
    SPOOL_SUFFIX,
    IngestPipeline,
    IngestReport,
    InvalidBatchName,
    PipelineError,
    TransientPipelineError,
    encode_dataset,
)
from worker.tasks import INGEST_QUEUE, INGEST_TASK, enqueue_ingest

__all__ = [
    "INGEST_QUEUE",
    "INGEST_TASK",
    "SPOOL_SUFFIX",
    "IngestPipeline",
    "IngestReport",
    "InvalidBatchName",
    "PipelineError",
    "TransientPipelineError",
    "create_celery_app",
    "encode_dataset",
    "enqueue_ingest",
    "filesystem_broker_options",
]
