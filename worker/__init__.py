"""The worker: Celery app and tasks running the ingest pipeline (de-identify, compress,
store, index) and the study completion (metadata, thumbnails, KOS manifest, webhooks).
The spool it reads is `spool`'s, the imaging code it runs `imaging`'s."""

from worker.app import create_celery_app, filesystem_broker_options
from worker.completion import StudyCompletion, derived_uid
from worker.events import Webhook, sign, verify
from worker.pipeline import (
    IngestPipeline,
    IngestReport,
    InvalidBatchName,
    PipelineError,
    TransientPipelineError,
    instance_json,
    read_local_patient_id,
    read_provenance,
    record_for,
)
from worker.recovery import (
    WORKER_MARK,
    BrokerEpoch,
    RecoveryLoop,
    broker_epoch,
    completion_job_dir,
    record_reserved,
    task_directory,
)
from worker.tasks import (
    COMPLETE_STUDY_TASK,
    INGEST_TASK,
    WEBHOOK_TASK,
    WorkerContext,
    enqueue_completion,
    enqueue_ingest,
    ingest_queue,
)

__all__ = [
    "COMPLETE_STUDY_TASK",
    "INGEST_TASK",
    "WEBHOOK_TASK",
    "WORKER_MARK",
    "BrokerEpoch",
    "IngestPipeline",
    "IngestReport",
    "InvalidBatchName",
    "PipelineError",
    "RecoveryLoop",
    "StudyCompletion",
    "TransientPipelineError",
    "Webhook",
    "WorkerContext",
    "broker_epoch",
    "completion_job_dir",
    "create_celery_app",
    "derived_uid",
    "enqueue_completion",
    "enqueue_ingest",
    "filesystem_broker_options",
    "ingest_queue",
    "instance_json",
    "read_local_patient_id",
    "read_provenance",
    "record_for",
    "record_reserved",
    "sign",
    "task_directory",
    "verify",
]
