"""Study completion: once a study has been quiet for a while, derive its study-level objects.

For each due study: the series `metadata.json` (DICOM JSON of every instance, assembled
from the per-instance JSON written at ingest), a thumbnail per series, the KOS manifest
(`manifest-kos.dcm`, what the DMP / XDS-I.b indexes), and a `study.stored` event for each
configured webhook. Everything is deterministic, so running it twice overwrites.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from imaging import RenderError, render_thumbnail
from storage import (
    DueStudy,
    IndexRepository,
    ObjectStore,
    TransientStorageError,
    instance_metadata_key,
    manifest_key,
    series_metadata_key,
    series_thumbnail_key,
)
from worker.derived import DerivedObjectError, build_kos_manifest, choose_series_thumbnail_instance
from worker.events import Webhook, encode_event

log = logging.getLogger(__name__)

#: Waits before a study whose completion failed is tried again (then the last, each time).
COMPLETION_RETRY_SECONDS = (60.0, 300.0, 1800.0, 3600.0)

#: (webhook index, event type, delivery id, body): hands one delivery to the task queue.
DeliverySink = Callable[[int, str, str, bytes], None]


def derived_uid(purpose: str, study_instance_uid: str) -> str:
    """A deterministic `2.25.` UID for an object derived from a (pseudonymous) study."""
    digest = hashlib.sha256(f"dicom-gateway/{purpose}/{study_instance_uid}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _bulk_data_not_read(_tag: str, _vr: str, _uri: str) -> bytes:
    return b""


@dataclass
class StudyCompletion:
    """The completion step's dependencies."""

    store: ObjectStore
    index: IndexRepository
    site_id: str
    webhooks: tuple[Webhook, ...] = ()
    deliver: DeliverySink | None = None
    retrieve_url_base: str | None = None
    completed: list[str] = field(default_factory=list)
    #: The sites whose studies this worker completes (default: `site_id`'s alone).
    site_ids: tuple[str, ...] = ()

    def run(self, quiet_seconds: float) -> list[str]:
        """Complete every study of this worker's sites quiet for `quiet_seconds`; return
        their UIDs. A study whose completion fails (an object missing, a header that
        cannot be read) is recorded as failed and due again later, with a growing wait;
        the others go on. A failure of the index or object store themselves raises: the
        whole run is retried."""
        done = []
        sites = self.site_ids or (self.site_id,)
        for due in self.index.studies_due_for_completion(quiet_seconds, sites):
            try:
                self.complete(due)
            except (TransientStorageError, SQLAlchemyError):
                raise
            except Exception as exc:  # noqa: BLE001 - this study's own trouble: recorded, retried
                wait = COMPLETION_RETRY_SECONDS[
                    min(due.attempts, len(COMPLETION_RETRY_SECONDS) - 1)
                ]
                self.index.mark_completion_failed(due, type(exc).__name__, wait)
                log.warning(
                    "study completion failed (%s, attempt %d); retried in %.0f s",
                    type(exc).__name__,
                    due.attempts + 1,
                    wait,
                )
                continue
            done.append(due.study_instance_uid)
        return done

    def complete(self, due: DueStudy) -> None:
        study_uid, instance_count = due.study_instance_uid, due.instance_count
        instances = self.index.study_instances(study_uid)
        by_series: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for series_uid, sop_uid, sop_class, key in instances:
            by_series[series_uid].append((sop_uid, sop_class, key))
        headers: list[Dataset] = []
        modalities: set[str] = set()
        for series_uid, members in by_series.items():
            documents = [
                json.loads(self.store.get(instance_metadata_key(study_uid, series_uid, sop)))
                for sop, _cls, _key in members
            ]
            self.store.put(
                series_metadata_key(study_uid, series_uid),
                json.dumps(documents).encode(),
                content_type="application/dicom+json",
            )
            # Headers: bulk data (pixels) stays in the objects; an empty value marks it present.
            series_headers = [
                Dataset.from_json(d, bulk_data_uri_handler=_bulk_data_not_read) for d in documents
            ]
            headers.extend(series_headers)
            modalities |= {str(h.get("Modality", "")) for h in series_headers if h.get("Modality")}
            self._thumbnail(study_uid, series_uid, series_headers, members)
        retrieve_url = (
            f"{self.retrieve_url_base.rstrip('/')}/studies/{study_uid}"
            if self.retrieve_url_base
            else None
        )
        manifest = build_kos_manifest(
            headers,
            manifest_series_instance_uid=derived_uid("kos-series", study_uid),
            manifest_sop_instance_uid=derived_uid("kos-instance", study_uid),
            retrieve_url=retrieve_url,
        )
        buffer = BytesIO()
        manifest.save_as(buffer, enforce_file_format=True)
        self.store.put(manifest_key(study_uid), buffer.getvalue())
        self._emit(study_uid, instance_count, len(by_series), sorted(modalities), headers[0])
        self.index.mark_completed(due)
        log.info("study completed: %d instances, %d series", instance_count, len(by_series))

    def _thumbnail(
        self,
        study_uid: str,
        series_uid: str,
        headers: list[Dataset],
        members: list[tuple[str, str, str]],
    ) -> None:
        try:
            chosen = choose_series_thumbnail_instance(headers)
        except DerivedObjectError:
            return  # no pixel data in this series (SR, KOS...)
        key = next(k for sop, _cls, k in members if sop == str(chosen.SOPInstanceUID))
        dataset = pydicom.dcmread(BytesIO(self.store.get(key)))
        try:
            png = render_thumbnail(dataset)
        except (RenderError, ValueError, RuntimeError, NotImplementedError) as exc:
            log.warning("thumbnail not rendered (%s)", type(exc).__name__)
            return
        self.store.put(series_thumbnail_key(study_uid, series_uid), png, content_type="image/png")

    def _emit(
        self, study_uid: str, count: int, series: int, modalities: list[str], header: Dataset
    ) -> None:
        if not self.webhooks or self.deliver is None:
            return
        event: dict[str, Any] = {
            "event": "study.stored",
            "study_instance_uid": study_uid,
            "patient_id": str(header.get("PatientID", "")),
            "accession_number": str(header.get("AccessionNumber", "")),
            "study_date": str(header.get("StudyDate", "")),
            "modalities": modalities,
            "number_of_series": series,
            "number_of_instances": count,
            "site_id": self.site_id,
            "manifest_key": manifest_key(study_uid),
        }
        body = encode_event(event)
        # One delivery id per (study, content): a redelivered completion repeats the id.
        delivery_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{study_uid}/{count}"))
        for number in range(len(self.webhooks)):
            self.deliver(number, "study.stored", delivery_id, body)
