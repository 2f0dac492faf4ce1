"""Worker scale-out on the production column: pipeline throughput with 1, 2 and 4 worker
processes on one site, and with two sites ingesting at once (each its own worker).

Every component runs in its own process, as deployed (`tests/support/cluster.py`: the
units and example settings of `deploy/`, on Redis + PostgreSQL + SeaweedFS on loopback).
For each configuration a fresh cluster (new database and bucket, one SeaweedFS for all)
receives N generated CT instances (512x512, 16-bit) by storescu while its workers are
stopped: they wait, acknowledged, in the site's spool and queue. Then the workers start
and the time from their readiness to the last instance indexed gives instances/s; the
backlog (instances in the spool, tasks in the queue, instances indexed) is printed every
2 s. At the end, the CPU seconds used meanwhile by the workers (all their processes),
SeaweedFS, the PostgreSQL backends of the database and Redis, against the wall time and
the machine's total CPU: what limits the throughput.
Run: python benchmarks/scaleout.py [-n 480] [--processes 1 2 4] [--codec jpeg-ls] [--no-two-sites]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis
from pipeline import _group_peak_rss_mb

from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from tests.support.cluster import Cluster, process_cpu_seconds
from tests.support.seaweedfs import SeaweedFS
from worker import INGEST_TASK

SAMPLE_EVERY = 2.0


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def _redis_cpu(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    finally:
        client.close()


@dataclass
class Figures:
    label: str
    instances: int
    megabytes: float
    seconds: float
    #: instances/s after the first batch was indexed (fresh worker processes warmed up)
    steady_rate: float
    cpu: dict[str, float]  # CPU seconds during the run, by process
    machine_busy: float
    peak_rss_mb: float

    def show(self) -> str:
        wall = self.seconds
        used = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.cpu.items())
        return (f"{self.label}: {self.instances} instances in {wall:.1f} s -> "
                f"{self.instances / wall:5.1f} inst/s ({self.megabytes / wall:5.1f} MB/s); "
                f"after the first batch {self.steady_rate:5.1f} inst/s\n"
                f"    CPU seconds: {used}; workers used {self.cpu['workers'] / wall:.2f} cores, "
                f"{self.cpu['workers'] / self.instances * 1000:.0f} ms per instance; machine busy "
                f"{self.machine_busy:.0%} of {os.cpu_count()} CPUs; workers' peak RSS "
                f"{self.peak_rss_mb:.0f} MB")


def _database_backends(cluster: Cluster) -> list[int]:
    return [int(pid) for (pid,) in cluster.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()")]


def run(label: str, root: Path, s3: SeaweedFS, studies: dict[str, Path], processes: int,
        codec: str, batch_size: int) -> Figures:
    """One configuration: `studies` maps a site to the folder it receives."""
    count = sum(len(list(folder.glob("*.dcm"))) for folder in studies.values())
    megabytes = sum(p.stat().st_size for f in studies.values() for p in f.glob("*.dcm")) / 1e6
    with Cluster(root, sites=tuple(studies), apis=0, worker_concurrency=processes,
                 seaweedfs=s3, start_workers=False,
                 settings={"log_level": "WARNING", "worker__compression": codec,
                           "worker__study_quiet_seconds": "3600",
                           "dicom__batch_size": str(batch_size)}) as cluster:
        for site, folder in studies.items():
            cluster.send(site, folder)
        sites = list(cluster.sites.values())
        print(f"  {label}: {count} instances acknowledged, waiting in "
              f"{sum(cluster.queue_length(s.site_id, INGEST_TASK) for s in sites)} queued ingest "
              f"tasks; starting the worker(s)", flush=True)
        for site in sites:
            site.worker.start()
        for site in sites:
            site.worker.wait_ready(cluster.timeout)
        started = time.perf_counter()
        busy0, total0 = _machine_cpu()

        def usage() -> dict[str, float]:
            return {"workers": sum(s.worker.cpu_seconds() for s in sites),
                    "SeaweedFS": process_cpu_seconds(s3.pid) if s3.pid else 0.0,
                    "Redis": _redis_cpu(cluster.redis_url),
                    "nodes": sum(s.node.cpu_seconds() for s in sites),
                    "this script": process_cpu_seconds(os.getpid())}

        before = usage()
        next_sample, first = started, None
        while (indexed := cluster.count_instances()) < count:
            now = time.perf_counter()
            if indexed and first is None:
                first = (now, indexed)
            if now >= next_sample:
                spooled = sum(s.spooled() for s in sites)
                queued = sum(cluster.queue_length(s.site_id, INGEST_TASK) for s in sites)
                print(f"    {now - started:5.1f} s  spool {spooled:4d}  ingest tasks queued "
                      f"{queued:3d}  indexed {indexed:4d}", flush=True)
                next_sample += SAMPLE_EVERY
            if now - started > 900:
                sys.exit(f"{label}: not indexed within 900 s")
            if any(not s.worker.alive() for s in sites):
                sys.exit(f"{label}: a worker died\n" + "\n".join(s.worker.log_tail() for s in sites))
            time.sleep(0.1)
        ended = time.perf_counter()
        seconds = ended - started
        busy1, total1 = _machine_cpu()
        after = usage()
        cpu = {name: after[name] - before[name] for name in before}
        # the database is fresh: its backends' whole lifetime is (about) this run
        cpu["PostgreSQL"] = sum(process_cpu_seconds(pid) for pid in _database_backends(cluster))
        cpu["rest of the machine"] = (busy1 - busy0) - sum(cpu.values())
        start_at, first_count = first or (started, 0)
        figures = Figures(
            label, count, megabytes, seconds,
            steady_rate=(count - first_count) / (ended - start_at) if ended > start_at else 0.0,
            cpu=cpu, machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0,
            peak_rss_mb=sum(_group_peak_rss_mb(s.worker.pid) for s in sites))
        print(f"    {seconds:5.1f} s  spool {sum(s.spooled() for s in sites):4d}  indexed {count:4d}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=480)
    parser.add_argument("--codec", default="jpeg-ls")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4],
                        help="worker process counts on one site")
    parser.add_argument("--batch-size", type=int, default=20,
                        help="instances per spool batch (DICOM__BATCH_SIZE): one task each")
    parser.add_argument("--no-two-sites", dest="two_sites", action="store_false",
                        help="skip the two-sites configuration")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu (dcmtk) is required: apt-get install dcmtk")
    work = Path(tempfile.mkdtemp(prefix="dgw-scaleout-"))
    try:
        one_site = work / "one-site"
        paths = write_sample_study(one_site, SampleStudySpec(ct_slices=args.instances, mr_slices=0))
        # Two sites at once: the same number of instances in all, half at each site.
        half = {site: work / f"two-sites-{site}" for site in ("A", "B")}
        for seed, (site, folder) in enumerate(half.items(), start=2):
            write_sample_study(folder, SampleStudySpec(
                ct_slices=args.instances // 2, mr_slices=0, seed=seed,
                identity=PlantedIdentity(patient_id=f"SCALE-{site}")))
        received = sum(p.stat().st_size for p in paths) / 1e6
        print(f"instances: {len(paths)} CT 512x512 16-bit, {received:.1f} MB, codec {args.codec}, "
              f"batches of {args.batch_size}, cpus: {os.cpu_count()}, load average before: "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        results = []
        with SeaweedFS(work / "seaweedfs") as s3:
            for processes in args.processes:
                results.append(run(f"1 site, {processes} worker process(es)", work / f"p{processes}",
                                   s3, {"A": one_site}, processes, args.codec, args.batch_size))
            if args.two_sites:
                results.append(run("2 sites at once, 1 worker process each", work / "two-sites",
                                   s3, half, 1, args.codec, args.batch_size))
        print()
        for figures in results:
            print(figures.show())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
