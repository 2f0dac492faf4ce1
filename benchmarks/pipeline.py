"""Whole-pipeline throughput: de-identify + compress (JPEG-LS) + verify + store + index.

N generated CT instances (512x512, 16-bit) are spooled as 8 batches and processed by a real
`dicom-gateway worker` (embedded defaults: filesystem broker, SQLite, filesystem objects)
with 1 and then 2 worker processes. Prints instances/s, MB/s (of received data), the
compression ratio (stored / received bytes) and the peak RSS of the worker processes.
Run: python benchmarks/pipeline.py [-n 240] [--codec jpeg-ls|htj2k|jpeg-2000|none] [--processes 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from gateway.sample_study import SampleStudySpec, write_sample_study  # noqa: E402
from storage import IndexRepository, create_index_engine, migrate  # noqa: E402
from worker import create_celery_app, enqueue_ingest, filesystem_broker_options  # noqa: E402

BATCHES = 8
SECRET = "benchmark-pseudonym-secret-0123456789"


def _group_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over the process and its children."""
    pids = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids += [int(p) for p in children.split()]
    total = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run(source: Path, processes: int, codec: str, count: int) -> tuple[float, float, float]:
    work = Path(tempfile.mkdtemp(prefix="dgw-pipeline-"))
    site = "bench"
    for number, path in enumerate(sorted(source.glob("*.dcm"))):
        batch = work / "spool" / site / f"batch-{number % BATCHES}"
        batch.mkdir(parents=True, exist_ok=True)
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        shutil.copy(path, batch / f"{uid}.dcm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_GATEWAY_")}
    env.update({"DICOM_GATEWAY_DATA_DIR": str(work), "DICOM_GATEWAY_SITE_ID": site,
                "DICOM_GATEWAY_PSEUDONYM_SECRET": SECRET, "DICOM_GATEWAY_LOG_LEVEL": "WARNING",
                "DICOM_GATEWAY_WORKER__COMPRESSION": codec,
                "DICOM_GATEWAY_WORKER__STUDY_QUIET_SECONDS": "3600"})
    worker = subprocess.Popen([sys.executable, "-m", "gateway", "worker", "--concurrency",
                               str(processes)], env=env, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (work / "run" / "worker.ready").exists():
            if worker.poll() is not None:
                sys.exit("worker did not start")
            time.sleep(0.05)
        engine = create_index_engine(f"sqlite:///{work / 'index.sqlite3'}")
        migrate(engine)
        index = IndexRepository(engine)
        app = create_celery_app("filesystem://", site_id=site,
                                transport_options=filesystem_broker_options(work / "broker"))
        started = time.perf_counter()
        for number in range(BATCHES):
            enqueue_ingest(app, site, f"batch-{number}")
        while len(index.dump()["instances"]) < count:
            if time.perf_counter() - started > 900:
                sys.exit("pipeline did not finish in 900 s")
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        peak = _group_peak_rss_mb(worker.pid)
        stored = sum(p.stat().st_size for p in (work / "objects").rglob("*.dcm"))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the figures are taken; do not wait for ETA tasks
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        shutil.rmtree(work, ignore_errors=True)
    return elapsed, stored, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=240)
    parser.add_argument("--codec", default="jpeg-ls")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="worker process counts to measure, e.g. 1 2 4 (scale-out)")
    args = parser.parse_args()
    source = Path(tempfile.mkdtemp(prefix="dgw-source-"))
    paths = write_sample_study(source, SampleStudySpec(ct_slices=args.instances, mr_slices=0))
    received = sum(p.stat().st_size for p in paths)
    print(f"instances: {len(paths)} CT 512x512 16-bit, {received / 1e6:.1f} MB, codec {args.codec}, "
          f"cpus: {os.cpu_count()}")
    for processes in args.processes:
        elapsed, stored, peak = run(source, processes, args.codec, len(paths))
        print(f"{processes} worker process(es): {len(paths) / elapsed:6.1f} inst/s  "
              f"{received / 1e6 / elapsed:6.1f} MB/s  ratio {stored / received:.3f}  "
              f"peak RSS {peak:.0f} MB")
    shutil.rmtree(source, ignore_errors=True)
    real_ct_ratios(args.codec)


def real_ct_ratios(codec: str) -> None:
    """Compression ratio on the real 512x512 CTs of pydicom-data (the synthetic phantom has
    noise in the air too, so it compresses worse than real scans)."""
    import copy

    from pydicom.data import get_testdata_file

    from imaging import Codec, transcode_lossless

    if codec == "none":
        return
    for name in ("693_UNCR.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm"):
        found = get_testdata_file(name)
        if not found:
            continue
        dataset = pydicom.dcmread(str(found))
        outcome = transcode_lossless(copy.deepcopy(dataset), Codec(codec))
        print(f"real CT {name}: ratio {outcome.stored_bytes / outcome.original_bytes:.3f} "
              f"({outcome.status.value})")


if __name__ == "__main__":
    main()
