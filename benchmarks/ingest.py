"""Ingest, end to end, against Orthanc with ingest transcoding: N generated CT instances
(512x512, 16-bit) sent by dcmtk's storescu on 1 and on 4 associations, from the first byte
sent until the last instance is searchable.

- ours: `dicom-gateway serve` (node, worker, API: de-identify, lossless compression with
  independent verification, object + DICOM JSON, index), on the embedded column (SQLite,
  filesystem objects and broker) and on the production column (Redis, PostgreSQL,
  SeaweedFS S3, all on loopback);
- with `--orthanc`: Debian's Orthanc at its best configuration — `IngestTranscoding` to
  JPEG-LS lossless (stored compressed and indexed in the C-STORE), `TCP_NODELAY=1` (DCMTK
  reads it; so does storescu, for both systems) — and, as the reference for acceptance
  alone, the same Orthanc storing files as received ("orthanc-plain"); all alternated with
  ours, round by round, on fresh studies (new UIDs each time).

Prints, per configuration: instances/s accepted (storescu's wall time) and end to end, the
ratios to Orthanc (end to end to Orthanc with transcoding, acceptance to Orthanc
without), CPU milliseconds per instance of each process (node, worker and its pool,
API; Orthanc; the production services), and peak resident memory. Run:

    python benchmarks/ingest.py [-n 200] [--rounds 3] [--associations 1 4]
                                [--columns embedded production] [--orthanc] [--codec htj2k]
                                [--before TREE]   # another checkout, alternated too
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.support.process_memory import gateway_processes
from tests.support.services import free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECRET = "benchmark-pseudonym-secret-0123456789abcdef"
TOKEN = "benchmark-admin-token-0123456789abcdef"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


# Processes: CPU time and peak memory ----------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own, not its children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def processes_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
    return found


@dataclass
class System:
    """One system under test: how to send to it, how to count what it indexed, which
    processes to account (component name -> pids, looked up at each sample)."""

    name: str
    dicom_port: int
    ae_title: str
    count: Any
    processes: Any
    stored: int = 0
    http_port: int = 0
    token: str = ""
    pid: int = 0

    def cpu(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for component, pids in self.processes().items():
            totals[component] = totals.get(component, 0.0) + sum(cpu_seconds(p) for p in pids)
        return totals

    def peaks(self) -> dict[str, float]:
        return {component: max((peak_rss_mb(p) for p in pids), default=0.0)
                for component, pids in self.processes().items()}


def _parent(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def _serve_processes(serve_pid: int, services: Any) -> Any:
    """serve's processes by component; Celery's pool processes (children of the worker's
    main process) apart; the production services' (looked up at each sample: PostgreSQL
    forks a process per connection)."""
    def processes() -> dict[str, list[int]]:
        named: dict[str, list[int]] = {"serve": [serve_pid], **services()}
        for pid, component in gateway_processes(serve_pid).items():
            if component == "worker" and _parent(pid) != serve_pid:
                component = "worker pool"
            named.setdefault(component, []).append(pid)
        return named
    return processes


# Ours -------------------------------------------------------------------------------------
@contextmanager
def production_column(work: Path) -> Iterator[dict[str, str]]:
    """A PostgreSQL database, a Redis key prefix and a SeaweedFS bucket of their own."""
    import psycopg2
    import redis

    from tests.support.seaweedfs import SeaweedFS

    database = f"bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    try:
        with SeaweedFS(work / "seaweedfs") as s3:
            s3.create_bucket("bench")
            yield {
                "DICOM_GATEWAY_DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
                "DICOM_GATEWAY_BROKER_URL": "redis://127.0.0.1:6379/0",
                "DICOM_GATEWAY_BROKER_TRANSPORT_OPTIONS": json.dumps({"global_keyprefix": prefix}),
                "DICOM_GATEWAY_OBJECT_STORE__BACKEND": "s3",
                "DICOM_GATEWAY_OBJECT_STORE__S3__ENDPOINT_URL": s3.endpoint_url,
                "DICOM_GATEWAY_OBJECT_STORE__S3__BUCKET": "bench",
                "DICOM_GATEWAY_OBJECT_STORE__S3__ACCESS_KEY_ID": s3.access_key,
                "DICOM_GATEWAY_OBJECT_STORE__S3__SECRET_ACCESS_KEY": s3.secret_key,
                "_SEAWEEDFS_PID": str(s3.pid),
            }
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


@contextmanager
def running_serve(work: Path, settings: dict[str, str], tree: Path = ROOT,
                  name: str = "ours") -> Iterator[System]:
    """`dicom-gateway serve` on free ports with its data under `work`, once ready; stopped
    with SIGINT (as Ctrl-C) on exit. `tree`: the checkout whose code runs."""
    dicom_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_GATEWAY_")}
    env.update({"DICOM_GATEWAY_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"), "PYTHONPATH": str(tree),
                "DICOM_GATEWAY_PSEUDONYM_SECRET": SECRET, "DICOM_GATEWAY_ADMIN_TOKEN": TOKEN,
                "DICOM_GATEWAY_WORKER__STUDY_QUIET_SECONDS": "3600", "TCP_NODELAY": "1",
                **{k: v for k, v in settings.items() if not k.startswith("_")}})
    def services() -> dict[str, list[int]]:
        if "_SEAWEEDFS_PID" not in settings:
            return {}
        return {"seaweedfs": [int(settings["_SEAWEEDFS_PID"])],
                "postgresql": processes_named("postgres"),
                "redis": processes_named("redis-server")}
    log_path = work / f"{name}.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--data-dir", str(work / name),
             "--dicom-port", str(dicom_port), "--http-port", str(http_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tree)
        try:
            deadline = time.monotonic() + 120
            while b"dicom-gateway is ready" not in log_path.read_bytes():
                if serve.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"serve did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.05)

            def count() -> int:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{http_port}/dicom-web/studies",
                    headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    body = json.loads(response.read() or b"[]")
                return sum(int(study["00201208"]["Value"][0]) for study in body)

            yield System(name, dicom_port, "DICOMGATEWAY", count,
                         _serve_processes(serve.pid, services), http_port=http_port,
                         token=TOKEN, pid=serve.pid)
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=120)


# Orthanc ----------------------------------------------------------------------------------
@contextmanager
def running_orthanc(work: Path, *, transcoding: bool = True) -> Iterator[System]:
    """Debian's Orthanc: JPEG-LS lossless ingest transcoding (or, `transcoding` False, files
    stored as received: its acceptance alone), TCP_NODELAY=1, SQLite index and files on
    disk (its defaults otherwise)."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        sys.exit("Orthanc is required for --orthanc: apt-get install orthanc")
    name = "orthanc" if transcoding else "orthanc-plain"
    folder = work / name
    folder.mkdir(parents=True)
    dicom_port, http_port = free_port(), free_port()
    config = {"Name": "bench", "DicomAet": "ORTHANC", "DicomPort": dicom_port,
              "HttpPort": http_port, "StorageDirectory": str(folder), "IndexDirectory": str(folder),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomCheckCalledAet": False,
              **({"IngestTranscoding": JPEG_LS_LOSSLESS} if transcoding else {})}
    (folder / "orthanc.json").write_text(json.dumps(config))
    env = {**os.environ, "TCP_NODELAY": "1"}
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            def count() -> int:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics",
                                            timeout=10) as response:
                    return int(json.loads(response.read())["CountInstances"])

            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError):
                    count()
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit("Orthanc did not start")
                time.sleep(0.1)
            yield System(name, dicom_port, "ORTHANC", count,
                         lambda: {"orthanc": [process.pid]})
        finally:
            process.terminate()
            process.wait(timeout=60)


# One round --------------------------------------------------------------------------------
@dataclass
class Figures:
    accepted: list[float] = field(default_factory=list)  # instances/s
    end_to_end: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # ms per instance


def send(storescu: str, system: System, paths: list[Path], associations: int) -> float:
    started = time.perf_counter()
    env = {**os.environ, "TCP_NODELAY": "1"}
    senders = [subprocess.Popen([storescu, "-aec", system.ae_title, "127.0.0.1",
                                 str(system.dicom_port), *map(str, paths[k::associations])],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for k in range(associations)]
    for sender in senders:
        _, errors = sender.communicate()
        if sender.returncode != 0:
            sys.exit(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def one_round(storescu: str, system: System, paths: list[Path], associations: int,
              figures: Figures) -> None:
    before = system.cpu()
    started = time.perf_counter()
    accepted = send(storescu, system, paths, associations)
    system.stored += len(paths)
    while system.count() < system.stored:
        if time.perf_counter() - started > 900:
            sys.exit(f"{system.name}: not searchable within 900 s")
        time.sleep(0.02)
    end_to_end = time.perf_counter() - started
    after = system.cpu()
    figures.accepted.append(len(paths) / accepted)
    figures.end_to_end.append(len(paths) / end_to_end)
    for component, seconds in after.items():
        used = (seconds - before.get(component, 0.0)) * 1000 / len(paths)
        figures.cpu.setdefault(component, []).append(used)


def _range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def report(column: str, associations: int, results: dict[str, Figures],
           peaks: dict[str, dict[str, float]]) -> None:
    print(f"\n== {column} column, {associations} association(s)")
    for name, figures in results.items():
        print(f"  {name:10s} accepted {_range(figures.accepted):>22s} inst/s   "
              f"end to end {_range(figures.end_to_end):>22s} inst/s")
        cpu = "  ".join(f"{component} {statistics.median(values):.2f}"
                        for component, values in sorted(figures.cpu.items()) if max(values) > 0)
        print(f"  {'':10s} CPU ms per instance: {cpu}")
        print(f"  {'':10s} peak RSS MB: " + "  ".join(
            f"{component} {mb:.0f}" for component, mb in sorted(peaks.get(name, {}).items())))
    for name, figures in results.items():
        if name.startswith("orthanc"):
            continue
        for reference, what in (("orthanc", "end_to_end"), ("orthanc-plain", "accepted")):
            if reference in results:
                ratios = [ours / theirs for ours, theirs in zip(
                    getattr(figures, what), getattr(results[reference], what))]
                print(f"  {name} / {reference} {what.replace('_', ' ')}: {_range(ratios)} "
                      "(per round, alternated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--columns", nargs="+", default=["embedded", "production"],
                        choices=["embedded", "production"])
    parser.add_argument("--orthanc", action="store_true",
                        help="alternate with Orthanc (JPEG-LS ingest transcoding, TCP_NODELAY=1)")
    parser.add_argument("--codec", default="", help="WORKER__COMPRESSION (default: the setting's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a gateway setting for both trees, e.g. DICOM__BATCH_SIZE=10")
    parser.add_argument("--before", type=Path, help="another checkout, alternated as 'before'")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None:
        sys.exit("storescu (dcmtk) is required: apt-get install dcmtk")
    settings = {"DICOM_GATEWAY_WORKER__COMPRESSION": args.codec} if args.codec else {}
    settings.update({f"DICOM_GATEWAY_{key.upper()}": value
                     for key, value in (item.split("=", 1) for item in args.set)})
    work = Path(tempfile.mkdtemp(prefix="dgw-ingest-"))
    print(f"instances: {args.instances} CT 512x512 16-bit per round  rounds: {args.rounds}  "
          f"cpus: {os.cpu_count()}  codec: {args.codec or 'default'}")
    try:
        for column in args.columns:
            with contextlib.ExitStack() as stack:
                systems: list[System] = []
                column_settings = dict(settings)
                if column == "production":
                    column_settings.update(stack.enter_context(production_column(work / "prod")))
                systems.append(stack.enter_context(
                    running_serve(work, column_settings, name=f"ours-{column}")))
                if args.before:
                    before_settings = dict(column_settings)
                    if column == "production":  # its own database, queue and bucket
                        before_settings.update(stack.enter_context(production_column(
                            work / "prod-before")))
                    systems.append(stack.enter_context(running_serve(
                        work, before_settings, tree=args.before, name=f"before-{column}")))
                if args.orthanc:
                    systems.append(stack.enter_context(running_orthanc(work / column)))
                    systems.append(stack.enter_context(running_orthanc(work / column,
                                                                       transcoding=False)))
                for system in systems:  # warm: each loads its code and connections
                    one_round(storescu, system, _study(work, 10, seed=len(systems) * 1000 + len(system.name)),
                              1, Figures())
                for associations in args.associations:
                    results = {system.name: Figures() for system in systems}
                    for round_number in range(args.rounds):
                        order = systems if round_number % 2 == 0 else systems[::-1]
                        for system in order:
                            seed = hash((column, associations, round_number, system.name)) % 10**9
                            paths = _study(work, args.instances, seed=seed)
                            one_round(storescu, system, paths, associations, results[system.name])
                            shutil.rmtree(paths[0].parent, ignore_errors=True)
                    report(column, associations, results,
                           {system.name: system.peaks() for system in systems})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _study(work: Path, instances: int, seed: int) -> list[Path]:
    return write_sample_study(work / "studies" / str(seed),
                              SampleStudySpec(ct_slices=instances, mr_slices=0, seed=seed))


if __name__ == "__main__":
    main()
