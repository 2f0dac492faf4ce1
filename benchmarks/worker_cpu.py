"""The worker's own CPU per instance, in process, this checkout against another, alternated.

The pipeline (`IngestPipeline.ingest_batch`: de-identify, compress, verify, store, index)
built by the composition root from settings, as a worker builds it, runs on 200 generated
CT instances (512x512, 16-bit; 4 batches of 50 after a warm-up batch) in a fresh process
per run; the figure is that process's CPU time per instance (its threads included; the
index and object store servers not). End-to-end figures (`ingest.py`) move by 10-20% from
run to run on a 2-vCPU VM; this one isolates the code the worker runs.

Run: python benchmarks/worker_cpu.py --before TREE [--rounds 8] [--columns production embedded]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET = "benchmark-pseudonym-secret-0123456789abcdef"


def child(work: Path, source: Path) -> None:
    """In the tree on PYTHONPATH: build the pipeline from the environment, time batches."""
    from gateway.components import build_index, build_pipeline
    from gateway.settings import Settings

    settings = Settings()
    pipeline = build_pipeline(settings, build_index(settings))
    files = sorted(source.glob("*.dcm"))

    def batch(paths: list[Path], name: str) -> tuple[int, float]:
        folder = settings.spool_dir / settings.site_id / name
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, folder / path.name)
        started = time.process_time()
        report = pipeline.ingest_batch(settings.site_id, name)
        return report.stored, time.process_time() - started

    batch(files[:10], "warm-up")
    stored = seconds = 0.0
    for number in range(4):
        count, cpu = batch(files[10 + number * 50 : 60 + number * 50], f"b{number}")
        stored, seconds = stored + count, seconds + cpu
    print(json.dumps({"stored": stored, "cpu_ms": seconds / stored * 1000}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="another checkout")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--columns", nargs="+", default=["production", "embedded"],
                        choices=["production", "embedded"])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import psycopg2
    import pydicom

    from gateway.sample_study import SampleStudySpec, write_sample_study
    from tests.support.seaweedfs import SeaweedFS

    trees = {"this": ROOT, "before": args.before.resolve()}
    results: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in args.columns}
    admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    admin.autocommit = True
    with tempfile.TemporaryDirectory(prefix="dgw-worker-cpu-") as tmp, SeaweedFS(
            Path(tmp) / "seaweedfs") as s3:
        source = Path(tmp) / "source"
        source.mkdir()
        for path in write_sample_study(Path(tmp) / "generated",
                                       SampleStudySpec(ct_slices=210, mr_slices=0, ct_size=512)):
            path.rename(source / f"{pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm")
        print(f"instances: 200 CT 512x512 16-bit per run, rounds: {args.rounds}, alternated")
        for number in range(args.rounds):
            for column in args.columns:
                order = list(trees.items()) if number % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    work = Path(tempfile.mkdtemp(dir=tmp))
                    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_GATEWAY_")}
                    env.update({"PYTHONPATH": str(tree), "DICOM_GATEWAY_DATA_DIR": str(work / "data"),
                                "DICOM_GATEWAY_SITE_ID": "bench",
                                "DICOM_GATEWAY_PSEUDONYM_SECRET": SECRET})
                    database = f"worker_cpu_{uuid.uuid4().hex[:8]}"
                    if column == "production":
                        bucket = f"cpu-{uuid.uuid4().hex[:8]}"
                        s3.create_bucket(bucket)
                        with admin.cursor() as cursor:
                            cursor.execute(f'CREATE DATABASE "{database}"')
                        env.update({
                            "DICOM_GATEWAY_DATABASE_URL":
                                f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
                            "DICOM_GATEWAY_OBJECT_STORE__BACKEND": "s3",
                            "DICOM_GATEWAY_OBJECT_STORE__S3__ENDPOINT_URL": s3.endpoint_url,
                            "DICOM_GATEWAY_OBJECT_STORE__S3__BUCKET": bucket,
                            "DICOM_GATEWAY_OBJECT_STORE__S3__ACCESS_KEY_ID": s3.access_key,
                            "DICOM_GATEWAY_OBJECT_STORE__S3__SECRET_ACCESS_KEY": s3.secret_key,
                        })
                    try:
                        run = subprocess.run(
                            [sys.executable, str(Path(__file__).resolve()), "--child", str(work),
                             str(source)], env=env, cwd=tree, capture_output=True, text=True,
                            check=False)
                    finally:
                        if column == "production":
                            with admin.cursor() as cursor:
                                cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                    if run.returncode:
                        raise SystemExit(f"{name} ({tree}) failed:\n{run.stderr[-3000:]}")
                    cpu = json.loads(run.stdout.strip().splitlines()[-1])["cpu_ms"]
                    results[(name, column)].append(cpu)
                    print(f"  round {number + 1} {column:10} {name:6} {cpu:6.2f} ms CPU per instance",
                          flush=True)
    for (name, column), values in results.items():
        print(f"{column:10} {name:6} median {statistics.median(values):6.2f} ms "
              f"(range {min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
