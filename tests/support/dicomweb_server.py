"""A real DICOMweb server on loopback (uvicorn in a thread) over a real index and store,
holding one imported sample study (4 CT + 2 MR)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Self

import uvicorn

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.importer import run_import
from gateway.sample_study import SampleStudySpec, write_sample_study
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from tests.support.services import free_port, wait_for
from web_viewer_api import ApiConfig, StowTarget, create_app
from worker import IngestPipeline, Spool

TOKEN = "dicomweb-test-token-0123456789abcdef"


class DicomwebServer:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        engine = create_index_engine(f"sqlite:///{root / 'index.sqlite3'}")
        migrate(engine)
        self.index = IndexRepository(engine)
        self.store = FilesystemObjectStore(root / "objects")
        pipeline = IngestPipeline(self.store, self.index,
                                  DeidentificationPolicy(PseudonymKeys(b"w" * 32), "site1"),
                                  root / "spool", root / "quarantine")
        source = root / "source"
        write_sample_study(source, SampleStudySpec(ct_slices=4, mr_slices=2, ct_size=128, mr_size=64))
        run_import([source], pipeline, Spool(root / "spool", "site1"))
        self.port = free_port()
        self.pipeline = pipeline
        self.enqueued: list[tuple[str, str]] = []
        stow = StowTarget(Spool(root / "spool", "site1"),
                          lambda site, batch: self.enqueued.append((site, batch)),
                          max_bytes=4 * 1024 * 1024)
        # dicomweb-client sends "Host: 127.0.0.1" without the port: URLs come from public_url.
        app = create_app(ApiConfig(TOKEN, public_url=f"http://127.0.0.1:{self.port}", stow=stow,
                                   cors_origins=("https://viewer.example",)),
                         self.index, self.store)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"


    def __enter__(self) -> Self:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, what="uvicorn to start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
