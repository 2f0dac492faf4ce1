"""Mixed load on one `dicom-gateway serve` over loopback, for a bounded time: parallel storescu
associations sending CT studies, QIDO-RS/WADO-RS readers (a regional hospital), and share
viewers fetching frames. Prints throughput, latency percentiles, errors, the worker's
spool backlog over time and the peak RSS of each process.
Run: python benchmarks/load.py [--seconds 60] [--senders 4] [--readers 4] [--viewers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study  # noqa: E402
from ingest import System, running_serve  # noqa: E402


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--viewers", type=int, default=2)
    parser.add_argument("--instances", type=int, default=40, help="CT instances per sender's study")
    args = parser.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None:
        sys.exit("storescu (dcmtk) is required")
    work = Path(tempfile.mkdtemp(prefix="dgw-load-"))
    studies = []
    for number in range(args.senders):
        folder = work / f"study{number}"
        write_sample_study(folder, SampleStudySpec(
            ct_slices=args.instances, mr_slices=0, seed=500 + number,
            identity=PlantedIdentity(patient_id=f"LOAD-{number}", accession_number=f"LOAD{number:04d}")))
        studies.append(folder)
    try:
        with running_serve(work, {"DICOM_GATEWAY_WORKER__STUDY_QUIET_SECONDS": "5"}) as serve:
            _load(args, storescu, work, studies, serve)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spooled(spool: Path) -> int:
    """Instances waiting in the spool (batches vanish as they are done: walk errors ignored)."""
    return sum(1 for _, _, files in os.walk(spool) for name in files if name.endswith(".dcm"))


def _load(args: argparse.Namespace, storescu: str, work: Path, studies: list[Path], serve: System) -> None:
    """Run the load against `serve` and print the figures."""
    dicom_port, http_port, token = serve.dicom_port, serve.http_port, serve.token
    base = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": f"Bearer {token}"}
    # One study indexed first, so readers and viewers have something to read.
    subprocess.run([storescu, "-aec", "DICOMGATEWAY", "+sd", "127.0.0.1", str(dicom_port), str(studies[0])],
                   check=True, capture_output=True)
    while not httpx.get(f"{base}/dicom-web/studies", headers=auth).json():
        time.sleep(0.1)
    first = httpx.get(f"{base}/dicom-web/studies", headers=auth).json()[0]["0020000D"]["Value"][0]
    instances = httpx.get(f"{base}/dicom-web/studies/{first}/instances", headers=auth).json()
    share = httpx.post(f"{base}/api/shares", headers=auth,
                       json={"study_uids": [first], "expires_in": 3600}).json()["url"]

    stop = threading.Event()
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def record(kind: str, started: float, ok: bool) -> None:
        with lock:
            latencies[kind].append((time.perf_counter() - started) * 1000)
            counts[kind] += 1
            if not ok:
                errors[kind] += 1

    def sender(folder: Path) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            done = subprocess.run([storescu, "-aec", "DICOMGATEWAY", "+sd", "127.0.0.1", str(dicom_port),
                                   str(folder)], capture_output=True)
            with lock:
                counts["instances sent"] += args.instances
            record("storescu study", started, done.returncode == 0)

    def reader() -> None:
        with httpx.Client(timeout=60, headers=auth) as client:
            while not stop.is_set():
                for kind, url, accept in (
                        ("QIDO studies", f"{base}/dicom-web/studies?limit=50", "application/dicom+json"),
                        ("WADO series metadata", f"{base}/dicom-web/studies/{first}/metadata", "application/dicom+json")):
                    started = time.perf_counter()
                    answer = client.get(url, headers={"Accept": accept})
                    record(kind, started, answer.status_code == 200)

    def viewer() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                for item in instances:
                    if stop.is_set():
                        break
                    uid = {k: item[k]["Value"][0] for k in ("0020000D", "0020000E", "00080018")}
                    started = time.perf_counter()
                    answer = client.get(f"{share}/dicom-web/studies/{uid['0020000D']}/series/{uid['0020000E']}"
                                        f"/instances/{uid['00080018']}/frames/1",
                                        headers={"Accept": 'multipart/related; type="application/octet-stream"'})
                    record("share viewer frame", started, answer.status_code == 200)

    backlog: list[tuple[float, int]] = []
    threads = ([threading.Thread(target=sender, args=(s,), daemon=True) for s in studies]
               + [threading.Thread(target=reader, daemon=True) for _ in range(args.readers)]
               + [threading.Thread(target=viewer, daemon=True) for _ in range(args.viewers)])
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    data = work / serve.name  # running_serve's data folder
    spool = data / "spool"
    while time.perf_counter() - began < args.seconds:
        backlog.append((time.perf_counter() - began, _spooled(spool)))
        time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    drained = time.perf_counter()
    while _spooled(spool) and time.perf_counter() - drained < 600:
        time.sleep(0.5)
    drain_seconds = time.perf_counter() - drained
    pids = {"supervisor": serve.pid}
    for component in ("node", "worker", "api"):
        ready = data / "run" / f"{component}.ready"
        if ready.exists():
            pids[component] = int(ready.read_text())
    rss = {name: _peak_rss_mb(pid) for name, pid in pids.items()}

    print(f"{elapsed:.0f} s of load on {os.cpu_count()} CPUs: {args.senders} storescu senders "
          f"({args.instances} CT 512x512 per study), {args.readers} DICOMweb readers, {args.viewers} share viewers")
    print(f"instances sent: {counts['instances sent']} ({counts['instances sent'] / elapsed:.1f}/s)")
    for kind in sorted(latencies):
        values = latencies[kind]
        print(f"  {kind:24s} n={len(values):6d}  errors={errors[kind]:3d}  p50 {_pct(values, 50):8.1f} ms"
              f"  p95 {_pct(values, 95):8.1f} ms  p99 {_pct(values, 99):8.1f} ms")
    samples = ", ".join(f"{t:.0f}s:{n}" for t, n in backlog[:: max(1, len(backlog) // 12)])
    print(f"worker backlog (instances in the spool): {samples}; drained {drain_seconds:.0f} s after the load")
    print("peak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()))


if __name__ == "__main__":
    main()
