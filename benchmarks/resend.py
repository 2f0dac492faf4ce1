"""Ingest cost per instance in process, and the cost of the same study re-sent by another
site (stored twins compared, nothing replaced: the trust model's idempotent re-send).

One batch of 60 generated CT instances (512x512, 16-bit) through IngestPipeline on the
embedded column (SQLite, filesystem objects). Prints wall and CPU ms per instance.
Run: python benchmarks/resend.py LABEL [resend]   (alternate two trees to compare them)
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.sample_study import SampleStudySpec, write_sample_study
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from worker import IngestPipeline

root = Path(tempfile.mkdtemp())
src = write_sample_study(root / "src", SampleStudySpec(ct_slices=60, mr_slices=0, ct_size=512))
engine = create_index_engine(f"sqlite:///{root / 'index.sqlite3'}"); migrate(engine)
pipeline = IngestPipeline(FilesystemObjectStore(root / "objects"), IndexRepository(engine),
                          DeidentificationPolicy(PseudonymKeys(b"k" * 32), "site1"),
                          root / "spool", root / "quarantine")


def ingest(site_id: str, batch_id: str) -> tuple[int, int, float, float]:
    """Spool the study for `site_id`, ingest it: (stored, quarantined, wall s, CPU s)."""
    batch = root / "spool" / site_id / batch_id
    batch.mkdir(parents=True)
    for path in src:
        shutil.copy(path, batch / f"{pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm")
    cpu, wall = time.process_time(), time.perf_counter()
    report = pipeline.ingest_batch(site_id, batch_id)
    return report.stored, report.quarantined, time.perf_counter() - wall, time.process_time() - cpu


stored, _, wall, cpu = ingest("site1", "b1")
print(f"{sys.argv[1]}: {stored} stored, {wall / stored * 1000:.1f} ms wall, "
      f"{cpu / stored * 1000:.1f} ms CPU per instance")
if len(sys.argv) > 2:  # the same study re-sent by another site: stored twins compared
    stored, quarantined, wall, cpu = ingest("site2", "b2")
    print(f"  re-sent by site2: {stored} stored, {quarantined} quarantined, "
          f"{cpu / max(stored, 1) * 1000:.1f} ms CPU per instance")
shutil.rmtree(root)
