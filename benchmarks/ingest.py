"""Ingest throughput: N generated CT instances (512x512, 16-bit) sent by dcmtk's storescu
over one association to `dicom-gateway serve` (embedded defaults) on loopback.

Prints instances/s and MB/s for C-STORE acceptance (storescu wall time) and end to end
(until QIDO-RS reports every instance indexed). Run: python benchmarks/ingest.py [-n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.sample_study import SampleStudySpec, write_sample_study  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _indexed(http_port: int, token: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/dicom-web/studies",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read() or b"[]")
    return sum(int(study["00201208"]["Value"][0]) for study in body)


@dataclass(frozen=True)
class Serve:
    process: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    token: str


@contextmanager
def running_serve(work: Path, settings: dict[str, str], tree: Path = ROOT) -> Iterator[Serve]:
    """`dicom-gateway serve` on free ports with its data under `work`, once it printed its
    banner; stopped with SIGINT (as Ctrl-C) on exit. Its log is `work/serve.log`. `tree`:
    the checkout whose code runs (another worktree to compare two versions)."""
    dicom_port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_GATEWAY_")}
    env.update({"DICOM_GATEWAY_LOG_LEVEL": "WARNING", "PYTHONPATH": str(tree), **settings})
    with open(work / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--data-dir", str(work / "data"),
             "--dicom-port", str(dicom_port), "--http-port", str(http_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tree)
        try:
            deadline = time.monotonic() + 120
            while b"dicom-gateway is ready" not in (work / "serve.log").read_bytes():
                if serve.poll() is not None or time.monotonic() > deadline:
                    sys.exit("serve did not start:\n" + (work / "serve.log").read_text())
                time.sleep(0.05)
            token = json.loads((work / "data" / "secrets.json").read_text())["admin_token"]
            yield Serve(serve, dicom_port, http_port, token)
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=200)
    parser.add_argument("-a", "--associations", type=int, default=1,
                        help="parallel storescu associations sharing the instances")
    parser.add_argument("--orthanc", action="store_true",
                        help="also time Debian's Orthanc accepting the same files the same way")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--codec", default=os.environ.get("DICOM_GATEWAY_WORKER__COMPRESSION", "jpeg-ls"),
                        help="jpeg-ls (default), htj2k, jpeg-2000 or none")
    args = parser.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None:
        sys.exit("storescu (dcmtk) is required: apt-get install dcmtk")

    work = Path(tempfile.mkdtemp(prefix="dgw-bench-"))
    source = work / "study"
    paths = write_sample_study(source, SampleStudySpec(ct_slices=args.instances, mr_slices=0))
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    try:
        with running_serve(work, {"DICOM_GATEWAY_WORKER__COMPRESSION": args.codec}) as serve:
            started = time.perf_counter()
            accepted = _send(storescu, serve.dicom_port, "DICOMGATEWAY", paths, args.associations)
            while _indexed(serve.http_port, serve.token) < len(paths):
                if time.perf_counter() - started > 600:
                    sys.exit("not indexed within 600 s")
                time.sleep(0.02)
            end_to_end = time.perf_counter() - started
        # the same files, after our gateway has stopped (the machine to itself)
        orthanc_seconds = _orthanc_acceptance(storescu, paths, args.associations) if args.orthanc else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"instances: {len(paths)}  size: {megabytes:.1f} MB  cpus: {os.cpu_count()}  "
          f"codec: {args.codec}  associations: {args.associations}")
    print(f"C-STORE acceptance: {len(paths) / accepted:8.1f} instances/s  "
          f"{megabytes / accepted:7.1f} MB/s  ({accepted:.2f} s)")
    print(f"end to end (indexed): {len(paths) / end_to_end:6.1f} instances/s  "
          f"{megabytes / end_to_end:7.1f} MB/s  ({end_to_end:.2f} s)")
    if orthanc_seconds is not None:
        seconds = orthanc_seconds
        print(f"Orthanc C-STORE acceptance: {len(paths) / seconds:8.1f} instances/s  "
              f"{megabytes / seconds:7.1f} MB/s  ({seconds:.2f} s)")


def _send(storescu: str, port: int, ae_title: str, paths: list[Path], associations: int) -> float:
    started = time.perf_counter()
    senders = [subprocess.Popen([storescu, "-aec", ae_title, "127.0.0.1", str(port),
                                 *map(str, paths[k::associations])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for k in range(associations)]
    for sender in senders:
        _, errors = sender.communicate()
        if sender.returncode != 0:
            sys.exit(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def _orthanc_acceptance(storescu: str, paths: list[Path], associations: int) -> float:
    """Debian's Orthanc (DCMTK inside, SQLite index, files on disk) on the same loopback."""
    work = Path(tempfile.mkdtemp(prefix="dgw-orthanc-"))
    dicom_port, http_port = _free_port(), _free_port()
    config = {"Name": "bench", "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
              "StorageDirectory": str(work), "IndexDirectory": str(work),
              "RemoteAccessAllowed": False, "DicomCheckCalledAet": False}
    (work / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen(["/usr/sbin/Orthanc", str(work / "orthanc.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([shutil.which("echoscu") or "echoscu", "-aec", "ORTHANC", "127.0.0.1",
                              str(dicom_port)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                sys.exit("Orthanc did not start")
            time.sleep(0.1)
        return _send(storescu, dicom_port, "ORTHANC", paths, associations)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
