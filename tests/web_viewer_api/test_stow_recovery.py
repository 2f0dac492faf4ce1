"""STOW-RS acknowledges only what will be processed: refused (503) while no worker reads
the site's spool; otherwise each batch is claimed while written, handed over under its
claim and recorded with the broker's identity (`spool.recovery`)."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.sample_study import SampleStudySpec, build_sample_study
from spool import BatchClaim, ProcessMark, Spool, read_pending
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from web_viewer_api import ApiConfig, StowTarget, create_app

TOKEN = "stow-recovery-token-0123456789abcdef"
BOUNDARY = "stow-recovery"


def _body() -> bytes:
    parts = []
    for dataset in build_sample_study(SampleStudySpec(ct_slices=2, mr_slices=0, ct_size=16)):
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        parts.append(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                     + buffer.getvalue() + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _client(tmp_path: Path, target: StowTarget) -> TestClient:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    return TestClient(create_app(ApiConfig(TOKEN, stow=target), IndexRepository(engine),
                                 FilesystemObjectStore(tmp_path / "objects")))


HEADERS = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json",
           "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


def test_without_a_worker_on_the_spool_nothing_is_accepted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "site1")
    sent: list[str] = []
    target = StowTarget(spool, lambda site, batch: sent.append(batch) or "run-1",
                        processed=lambda: ProcessMark.any_alive(spool.root, "worker"))
    with _client(tmp_path, target) as client:
        response = client.post("/dicom-web/studies", content=_body(), headers=HEADERS)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"] == "5"
    assert sent == [] and not list(spool.root.rglob("*.dcm"))


def test_with_a_worker_each_batch_is_handed_over_under_its_claim_and_recorded(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "site1")
    mark = ProcessMark(spool.root, "worker")  # a worker's main process reading this spool
    claims_free: list[bool] = []

    def enqueue(site: str, batch: str) -> str:
        # The writer still holds the claim while it hands the batch over.
        claims_free.append(BatchClaim.acquire(spool.site_dir / batch, wait=False) is not None)
        return "redis-run-7"

    target = StowTarget(spool, enqueue, reply_seconds=0.2,
                        processed=lambda: ProcessMark.any_alive(spool.root, "worker"))
    try:
        with _client(tmp_path, target) as client:
            response = client.post("/dicom-web/studies", content=_body(), headers=HEADERS)
    finally:
        mark.close()
    assert response.status_code == 202, response.text  # no worker replied: pending
    [batch] = [p for p in spool.site_dir.iterdir() if not p.name.startswith(".")]
    assert claims_free == [False]
    record = read_pending(batch)
    assert record is not None and record.state == "queued" and record.epoch == "redis-run-7"
    released = BatchClaim.acquire(batch, wait=False)  # let go once recorded
    assert released is not None
    released.release()
