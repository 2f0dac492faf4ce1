"""Storage: the object store (S3 or filesystem, the source of truth) and the metadata index.

Object layout (de-identified data only):
    studies/<StudyUID>/series/<SeriesUID>/instances/<SOPInstanceUID>.dcm
"""

from storage.access import (
    AccessRepository,
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    ShareItemRecord,
    ShareRecord,
)
from storage.audit import DIMSE_ACTIONS, WORKER_ACTIONS, AuditWriter, dimse_entry
from storage.filesystem import FilesystemObjectStore
from storage.index import (
    MAX_FUZZY_WORDS,
    WITHHELD_REASONS,
    AccessScope,
    BoundedReads,
    DateRange,
    IndexRepository,
    InstanceQuery,
    InstanceRecord,
    InstanceSummary,
    Ownership,
    SeriesQuery,
    SeriesSummary,
    StudyQuery,
    StudySummary,
    TimeRange,
    WithheldRecord,
    WithheldSummary,
    create_index_engine,
    fuzzy_name_words,
    migrate,
)
from storage.objects import (
    AlreadyExists,
    IntegrityError,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    OpenableStore,
    OpenedObject,
    StorageError,
    TransientStorageError,
    join_key,
    validate_key,
)
from storage.query_retrieve import EVERY_SITE, QueryRetrieve
from storage.s3 import S3ObjectStore


def instance_key(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
    """The object key of one de-identified instance."""
    return join_key(
        "studies", study_instance_uid, "series", series_instance_uid,
        "instances", f"{sop_instance_uid}.dcm",
    )


__all__ = [
    "DIMSE_ACTIONS",
    "EVERY_SITE",
    "MAX_FUZZY_WORDS",
    "WITHHELD_REASONS",
    "WORKER_ACTIONS",
    "AccessRepository",
    "AccessScope",
    "AlreadyExists",
    "ApiKeyRecord",
    "AuditEntry",
    "AuditQuery",
    "AuditWriter",
    "BoundedReads",
    "DateRange",
    "FilesystemObjectStore",
    "IndexRepository",
    "InstanceQuery",
    "InstanceRecord",
    "InstanceSummary",
    "IntegrityError",
    "InvalidKey",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "OpenableStore",
    "OpenedObject",
    "Ownership",
    "QueryRetrieve",
    "S3ObjectStore",
    "SeriesQuery",
    "SeriesSummary",
    "ShareItemRecord",
    "ShareRecord",
    "StorageError",
    "StudyQuery",
    "StudySummary",
    "TimeRange",
    "TransientStorageError",
    "WithheldRecord",
    "WithheldSummary",
    "create_index_engine",
    "dimse_entry",
    "fuzzy_name_words",
    "instance_key",
    "join_key",
    "migrate",
    "validate_key",
]
