"""Rebuild the index from the object store alone (the store is the source of truth)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

import pydicom

from imaging.dataset import UNREADABLE_DATASET_ERRORS
from storage import STUDIES_PREFIX, IndexRepository, InstanceRecord, ObjectStore, is_instance_key
from worker.pipeline import StudyOwner, read_provenance, read_study_owner, record_for

log = logging.getLogger(__name__)

_BATCH = 200


@dataclass
class ReindexReport:
    indexed: int = 0
    unreadable: list[str] = field(default_factory=list)


def _record(
    store: ObjectStore,
    dataset: pydicom.Dataset,
    key: str,
    body: bytes,
    owners: dict[str, StudyOwner | None],
) -> InstanceRecord:
    """The record of a stored instance: its study's owner from `owner.json`; the site that
    stored it from the object when it names one (institution identity retained), else the
    study's owner (objects do not say which site wrote them)."""
    study_uid = key.split("/")[1]
    if study_uid not in owners:
        owners[study_uid] = read_study_owner(store, study_uid)
    owner = owners[study_uid]
    stamped_site = read_provenance(dataset)[0]
    if owner is None:  # stored before owners were recorded: the object's site owns it
        return record_for(dataset, key, body)
    return record_for(
        dataset, key, body, site_id=stamped_site or owner.site_id, study_site_id=owner.site_id
    )


def reindex(
    store: ObjectStore, index: IndexRepository, progress: Callable[[int], None] | None = None
) -> ReindexReport:
    """Empty the index, then upsert one row set per stored instance object."""
    report = ReindexReport()
    # The listing starts before the index is emptied: a store that cannot be listed
    # (unreachable, a broken link) fails here and leaves the index as it was.
    listing = iter(store.list(STUDIES_PREFIX))
    first = next(listing, None)
    index.clear()
    pending: list[InstanceRecord] = []
    owners: dict[str, StudyOwner | None] = {}
    for info in itertools.chain([first] if first is not None else [], listing):
        if not is_instance_key(info.key):
            continue  # metadata, thumbnails, manifests
        body = store.get(info.key)
        try:
            dataset = pydicom.dcmread(BytesIO(body), stop_before_pixels=True)
            pending.append(_record(store, dataset, info.key, body, owners))
        except UNREADABLE_DATASET_ERRORS as exc:
            log.warning("unreadable object %s (%s)", info.key, type(exc).__name__)
            report.unreadable.append(info.key)
            continue
        if len(pending) >= _BATCH:
            index.upsert_instances(pending)
            report.indexed += len(pending)
            pending = []
        if progress is not None:
            progress(1)
    if pending:
        index.upsert_instances(pending)
        report.indexed += len(pending)
    return report
