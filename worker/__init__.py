"""The worker: Celery app and tasks running the ingest pipeline (de-identify, store, index)."""

from anonymize import TruncatedDataSetError, check_complete
from worker.app import create_celery_app, filesystem_broker_options
from worker.completion import StudyCompletion, derived_uid, instance_metadata_key, manifest_key
from worker.dataset_errors import UNREADABLE_DATASET_ERRORS
from worker.events import Webhook, sign, verify
from worker.pipeline import (
    SPOOL_SUFFIX,
    IngestPipeline,
    IngestReport,
    InvalidBatchName,
    PipelineError,
    TransientPipelineError,
    encode_dataset,
    instance_json,
    read_local_patient_id,
    read_provenance,
    record_for,
)
from worker.replies import (
    BatchReply,
    InstanceOutcome,
    remove_stale_replies,
    request_reply,
    take_reply,
)
from worker.spool import (
    PRIVATE_DIRECTORY_MODE,
    PRIVATE_FILE_MODE,
    Spool,
    SpoolError,
    SpoolWriteError,
    close_private_tree,
    new_association_tag,
    open_private,
    private_directory,
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
from worker.transcode import Codec, TranscodeStatus, decompress_for_serving, transcode_lossless

__all__ = [
    "COMPLETE_STUDY_TASK",
    "INGEST_TASK",
    "PRIVATE_DIRECTORY_MODE",
    "PRIVATE_FILE_MODE",
    "SPOOL_SUFFIX",
    "UNREADABLE_DATASET_ERRORS",
    "WEBHOOK_TASK",
    "BatchReply",
    "Codec",
    "IngestPipeline",
    "IngestReport",
    "InstanceOutcome",
    "InvalidBatchName",
    "PipelineError",
    "Spool",
    "SpoolError",
    "SpoolWriteError",
    "StudyCompletion",
    "TranscodeStatus",
    "TransientPipelineError",
    "TruncatedDataSetError",
    "Webhook",
    "WorkerContext",
    "check_complete",
    "close_private_tree",
    "create_celery_app",
    "decompress_for_serving",
    "derived_uid",
    "encode_dataset",
    "enqueue_completion",
    "enqueue_ingest",
    "filesystem_broker_options",
    "ingest_queue",
    "instance_json",
    "instance_metadata_key",
    "manifest_key",
    "new_association_tag",
    "open_private",
    "private_directory",
    "read_local_patient_id",
    "read_provenance",
    "record_for",
    "remove_stale_replies",
    "request_reply",
    "sign",
    "take_reply",
    "transcode_lossless",
    "verify",
]
