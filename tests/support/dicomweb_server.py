"""A real DICOMweb server on loopback (uvicorn in a thread) over a real index and store,
holding one imported sample study (4 CT + 2 MR)."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import Any, Self

import uvicorn
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from anonymize import (
    DeidentificationPolicy,
    PseudonymKeys,
    pseudonymize_accession_number,
    pseudonymize_patient_id,
)
from gateway.importer import run_import
from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from imaging import Codec
from spool import Spool
from storage import (
    AccessRepository,
    AccessScope,
    FilesystemObjectStore,
    IndexRepository,
    InstanceRecord,
    StudyQuery,
    create_index_engine,
    instance_key,
    migrate,
)
from tests.support.services import free_port, wait_for
from web_viewer_api import ApiConfig, StowTarget, create_app
from worker import IngestPipeline

TOKEN = "dicomweb-test-token-0123456789abcdef"


class DicomwebServer:
    """`studies` sample studies (the first with the default planted identity, the others
    with their own); `config` adds ApiConfig fields (limits, OIDC, SMTP...); the index is
    SQLite under `root` unless `database_url` names another (PostgreSQL). `region`: the
    regional API, as `dicom-gateway api` builds it with HTTP__ROLE=region (no lookup; STOW-RS
    takes only objects of the domain)."""

    def __init__(self, root: Path, studies: int = 1, database_url: str | None = None, *,
                 region: bool = False, worker: bool = True, codec: Codec = Codec.HTJ2K,
                 **config: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        engine = create_index_engine(database_url or f"sqlite:///{root / 'index.sqlite3'}")
        migrate(engine)
        self.index = IndexRepository(engine)
        self.store = FilesystemObjectStore(root / "objects")
        pipeline = IngestPipeline(self.store, self.index,
                                  DeidentificationPolicy(PseudonymKeys(b"w" * 32), "site1"),
                                  root / "spool", root / "quarantine", codec=codec)
        source = root / "source"
        write_sample_study(source, SampleStudySpec(ct_slices=4, mr_slices=2, ct_size=128, mr_size=64))
        for number in range(1, studies):
            write_sample_study(source / f"extra{number}", SampleStudySpec(
                ct_slices=2, mr_slices=1, ct_size=64, mr_size=64, seed=100 + number,
                identity=PlantedIdentity(patient_id=f"IPP-EXTRA-{number}",
                                         accession_number=f"ACCX{number:05d}")))
        run_import([source], pipeline, Spool(root / "spool", "site1"))
        self.port = free_port()
        self.pipeline = pipeline
        self.enqueued: list[tuple[str, str]] = []
        index = self.index
        # The region's worker: no secret, only objects of the domain (HTTP__ROLE=region).
        self.writer_pipeline = (IngestPipeline(self.store, self.index,
                                               DeidentificationPolicy(None, "region"),
                                               root / "spool", root / "quarantine", region=True)
                                if region else pipeline)
        self.spool_site = "region" if region else "site1"
        writer = self.writer_pipeline

        def study_patient(study_instance_uid: str, scope: AccessScope) -> str | None:
            found = index.search_studies(StudyQuery(study_instance_uids=(study_instance_uid,),
                                                    scope=scope))
            return found[0].patient_id if found else None

        def enqueue(site_id: str, batch_id: str) -> None:
            """Like the broker and a worker: the batch is processed in the background
            (`worker=False`: only recorded, the test runs it)."""
            self.enqueued.append((site_id, batch_id))
            if worker:
                threading.Thread(target=writer.ingest_batch, args=(site_id, batch_id),
                                 daemon=True).start()

        stow = StowTarget(Spool(root / "spool", self.spool_site), enqueue,
                          max_bytes=4 * 1024 * 1024, study_patient=study_patient if region else None,
                          reply_seconds=30 if worker else 0.5)
        # dicomweb-client sends "Host: 127.0.0.1" without the port: URLs come from public_url.
        keys = PseudonymKeys(b"w" * 32)

        def lookup(accession: str | None, patient_id: str | None, accession_issuer: str,
                   patient_issuer: str, site_id: str) -> tuple[str | None, str | None]:
            return (pseudonymize_accession_number(keys, accession, site_id=site_id,
                                                  issuer=accession_issuer) if accession else None,
                    pseudonymize_patient_id(keys, patient_id, site_id=site_id,
                                            issuer=patient_issuer) if patient_id else None)

        self.app = create_app(ApiConfig(**{
            "admin_token": TOKEN, "public_url": f"http://127.0.0.1:{self.port}", "stow": stow,
            "cors_origins": ("https://viewer.example",), "lookup": None if region else lookup,
            "role": "region" if region else "site", "default_site": "site1", **config}),
            self.index, self.store)
        self.access = AccessRepository(engine)
        app = self.app
        # As `dicom-gateway api` runs it: the app alone decides whom X-Forwarded-For names.
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", proxy_headers=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def archive(self, dataset: Dataset) -> str:
        """Put `dataset` straight into the archive under new UIDs, as the pipeline would
        after de-identification (no transcoding: it is stored as it is); its study's UID."""
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        body = buffer.getvalue()
        key = instance_key(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
        self.store.put(key, body)
        self.index.upsert_instance(InstanceRecord.from_dataset(
            dataset, object_key=key, size_bytes=len(body), sha256=hashlib.sha256(body).hexdigest(),
            transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID), site_id="site1"))
        return str(dataset.StudyInstanceUID)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, what="uvicorn to start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
