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
batch = root / "spool" / "site1" / "b1"; batch.mkdir(parents=True)
for p in src:
    shutil.copy(p, batch / f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm")
cpu0 = time.process_time(); t0 = time.perf_counter()
report = pipeline.ingest_batch("site1", "b1")
wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
print(f"{sys.argv[1]}: {report.stored} stored, {wall/report.stored*1000:.1f} ms wall, {cpu/report.stored*1000:.1f} ms CPU per instance")
if len(sys.argv) > 2:  # the same study re-sent by another site: stored twins compared
    batch2 = root / "spool" / "site2" / "b2"; batch2.mkdir(parents=True)
    for p in src:
        shutil.copy(p, batch2 / f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm")
    cpu0 = time.process_time(); t0 = time.perf_counter()
    again = pipeline.ingest_batch("site2", "b2")
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"  re-sent by site2: {again.stored} stored, {again.quarantined} quarantined, {cpu/again.stored*1000:.1f} ms CPU per instance")
shutil.rmtree(root)
