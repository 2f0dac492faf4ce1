"""DICOMweb speed: QIDO-RS study search over a 100k-instance index, series metadata
latency, and WADO-RS series retrieve throughput, on a real server over loopback.

The index rows are generated directly (2,000 studies x 5 series x 10 instances); one real
study (50 CT 512x512, stored JPEG-LS by the pipeline) backs metadata and retrieve.
With --orthanc, Debian's Orthanc + DICOMweb plugin and a fresh gateway are both loaded
with the same 200 generated studies (2,000 instances) and the same QIDO requests are timed.
Run: python benchmarks/dicomweb.py [--requests 200] [--orthanc]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from anonymize import DeidentificationPolicy, PseudonymKeys  # noqa: E402
from gateway.sample_study import SampleStudySpec, write_sample_study  # noqa: E402
from storage import StudyQuery  # noqa: E402
from storage.index.models import Instance, Patient, Series, Study  # noqa: E402
from tests.support.dicomweb_server import TOKEN, DicomwebServer  # noqa: E402
from tests.support.services import free_port, wait_for  # noqa: E402


def _generate_index(server: DicomwebServer, studies: int = 2000) -> int:
    engine = server.index.engine
    with engine.begin() as connection:
        for start in range(0, studies, 200):
            patients, study_rows, series_rows, instance_rows = [], [], [], []
            for number in range(start, min(start + 200, studies)):
                patient = f"PBENCH{number % 700:05d}"
                study = f"2.25.9{number:07d}"
                patients.append({"patient_id": patient, "patient_name": f"ANONYMOUS^{patient}",
                                 "patient_birth_date": "", "patient_sex": ""})
                study_rows.append({"study_instance_uid": study, "patient_id": patient,
                                   "patient_name": f"ANONYMOUS^{patient}",
                                   "study_date": f"20{15 + number % 10}{1 + number % 12:02d}{1 + number % 28:02d}",
                                   "accession_number": f"A{number:07d}", "site_id": "bench"})
                for s in range(5):
                    series = f"{study}.{s + 1}"
                    series_rows.append({"series_instance_uid": series, "study_instance_uid": study,
                                        "modality": ("CT", "MR", "US", "CR", "PT")[s],
                                        "series_number": s + 1})
                    for i in range(10):
                        instance_rows.append({
                            "sop_instance_uid": f"{series}.{i + 1}", "series_instance_uid": series,
                            "study_instance_uid": study, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                            "instance_number": i + 1, "transfer_syntax_uid": "1.2.840.10008.1.2.4.80",
                            "object_key": f"studies/{study}/x/{i}.dcm", "size_bytes": 100000,
                            "sha256": "0" * 64})
            unique = {p["patient_id"]: p for p in patients}
            existing = {r[0] for r in connection.execute(Patient.__table__.select().with_only_columns(Patient.patient_id))}
            new_patients = [p for k, p in unique.items() if k not in existing]
            if new_patients:
                connection.execute(insert(Patient), new_patients)
            connection.execute(insert(Study), study_rows)
            connection.execute(insert(Series), series_rows)
            connection.execute(insert(Instance), instance_rows)
    return studies * 50


def _timings(client: httpx.Client, url: str, headers: dict[str, str], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        response.raise_for_status()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _paired(client: httpx.Client, ours: tuple[str, dict[str, str]], theirs: tuple[str, dict[str, str]],
            count: int) -> tuple[list[float], list[float]]:
    """Alternate the two servers request by request, so a busy moment of the machine
    weighs on both alike."""
    mine: list[float] = []
    other: list[float] = []
    for _ in range(count):
        mine += _timings(client, *ours, 1)
        other += _timings(client, *theirs, 1)
    return mine, other


def _curl_qido(ours: str, theirs: str, headers: dict[str, str], count: int,
               alternate: bool, work: Path) -> tuple[list[float], list[float]]:
    """QIDO timed by curl (a C client: Python's HTTP client adds about 0.3 ms to every
    request of both servers, which pulls any ratio towards 1), one kept-alive connection
    per server, requests alternated or each server's back to back; ms, after 10% warm-up."""
    urls = [u for _ in range(count) for u in (ours, theirs)] if alternate else [ours] * count + [theirs] * count
    config = work / "curl-qido.cfg"
    config.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    command = ["curl", "-sS", "-K", str(config), "-w", "%{http_code} %{time_total}\n"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    codes, seconds = lines[0::2], [float(t) * 1000 for t in lines[1::2]]
    assert set(codes) == {"200"}, set(codes)
    if alternate:
        mine, other = seconds[0::2], seconds[1::2]
    else:
        mine, other = seconds[:count], seconds[count:]
    return mine[count // 10:], other[count // 10:]


#: Alternated retrievals of each series by each server (after two warm-up rounds).
RETRIEVE_ROUNDS = 40


#: Retrievals per server for the CPU time figure.
CPU_RETRIEVALS = 20


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, all its threads: what a request
    costs the server, whatever the machine's other load did to the wall-clock time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1]


def _retrieve(client: httpx.Client, url: str, headers: dict[str, str],
              runs: int = 5) -> tuple[float, float]:
    """Best of `runs`: (MB/s delivered, seconds for the whole answer)."""
    best_rate, best_time = 0.0, float("inf")
    for _ in range(runs):
        started, size = time.perf_counter(), 0
        with client.stream("GET", url, headers=headers) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                size += len(chunk)
        elapsed = time.perf_counter() - started
        best_rate, best_time = max(best_rate, size / 1e6 / elapsed), min(best_time, elapsed)
    return best_rate, best_time


def _retrieve_curl(url: str, headers: dict[str, str]) -> tuple[int, float]:
    """One retrieval by curl (a C client, as a PACS would pull; Python's HTTP client reading
    26 MB would be the bottleneck for both servers): (bytes, seconds), from curl's own
    transfer timing."""
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    size, seconds = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    return int(size), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--orthanc", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgw-dicomweb-"))
    with DicomwebServer(work / "gateway") as server:
        real = work / "real"
        write_sample_study(real, SampleStudySpec(ct_slices=50, mr_slices=0, seed=31))
        from gateway.importer import run_import
        from spool import Spool

        run_import([real], server.pipeline, Spool(work / "gateway" / "spool", "site1"))
        target = next(s for s in server.index.search_studies(StudyQuery(limit=1000))
                      if s.number_of_instances == 50)
        series = server.index.search_instances(
            __import__("storage").InstanceQuery(study_instance_uid=target.study_instance_uid))[0].series_instance_uid
        rows = _generate_index(server) + 56
        auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
        with httpx.Client(timeout=120) as client:
            by_patient = _timings(client, f"{server.url}/studies?PatientID=PBENCH00042", auth, args.requests)
            by_range = _timings(client, f"{server.url}/studies?StudyDate=20180101-20181231&ModalitiesInStudy=MR&limit=50",
                                auth, args.requests)
            metadata = _timings(client, f"{server.url}/studies/{target.study_instance_uid}/series/{series}/metadata",
                                auth, max(20, args.requests // 10))
            retrieve, _ = _retrieve(client, f"{server.url}/studies/{target.study_instance_uid}/series/{series}", {
                "Authorization": f"Bearer {TOKEN}",
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        print(f"index: {rows} instances (SQLite), {args.requests} requests each, one client")
        print(f"QIDO studies by PatientID        p50 {_pct(by_patient, 50):6.1f} ms  p95 {_pct(by_patient, 95):6.1f} ms")
        print(f"QIDO studies by date range + MR  p50 {_pct(by_range, 50):6.1f} ms  p95 {_pct(by_range, 95):6.1f} ms")
        print(f"series metadata (50 instances)   p50 {_pct(metadata, 50):6.1f} ms  p95 {_pct(metadata, 95):6.1f} ms")
        print(f"WADO-RS series retrieve (as stored, JPEG-LS): {retrieve:6.1f} MB/s")
    if args.orthanc:
        _same_data(work, args.requests, real)
    shutil.rmtree(work, ignore_errors=True)


def _fifty_slice_series(server: DicomwebServer, exclude: str = "") -> Any:
    """The imported 50-slice CT series (the one not in study `exclude`)."""
    from storage import SeriesQuery

    study = next(s for s in server.index.search_studies(StudyQuery(limit=1000))
                 if s.number_of_instances == 50 and s.study_instance_uid != exclude)
    return server.index.search_series(SeriesQuery(study_instance_uid=study.study_instance_uid))[0]


def _same_data(work: Path, requests: int, real: Path, studies: int = 200) -> None:
    """Ours and Orthanc loaded with the same generated studies (10 CT 64x64 each), plus the
    real 50-slice CT series for the retrieve comparison."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.importer import run_import
    from spool import Spool

    source = work / "same"
    for number in range(studies):
        write_sample_study(source / f"s{number:04d}", SampleStudySpec(
            ct_slices=10, mr_slices=0, ct_size=64, seed=1000 + number,
            identity=__import__("gateway.sample_study", fromlist=["PlantedIdentity"]).PlantedIdentity(
                patient_id=f"IPP-{number:05d}", patient_name=f"PATIENT^{number:05d}"),
            with_ins=False))
    files = sorted(source.rglob("*.dcm"))
    import pydicom

    real_files = sorted(real.rglob("*.dcm"))
    first = pydicom.dcmread(real_files[0], stop_before_pixels=True)
    http_port = free_port()
    config = {"Name": "bench", "HttpPort": http_port, "DicomPort": free_port(),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "StorageDirectory": str(work / "orthanc"), "IndexDirectory": str(work / "orthanc"),
              "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen(["/usr/sbin/Orthanc", str(work / "orthanc.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/system", timeout=2).status_code == 200, timeout=60,
                 what="Orthanc")
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: client.post(f"{url}/instances", content=p.read_bytes())
                          .raise_for_status(), files + real_files))
        with DicomwebServer(work / "ours") as ours:
            run_import([source, real], ours.pipeline, Spool(work / "ours" / "spool", "site1"))
            big_series = _fifty_slice_series(ours)
            # The same CT series again, kept uncompressed (codec None) under other pseudonyms:
            # bytes for bytes what Orthanc serves.
            plain = dataclasses.replace(ours.pipeline, codec=None, policy=DeidentificationPolicy(
                PseudonymKeys(b"u" * 32), "site1"))
            run_import([real], plain, Spool(work / "ours" / "spool", "site1"))
            plain_series = _fifty_slice_series(ours, exclude=big_series.study_instance_uid)
            target = ours.index.search_studies(StudyQuery(limit=1))[0]
            # Ours as deployed: `dicom-gateway api` in its own process over the same files
            # (an in-thread server would share the GIL with this client; Orthanc does not).
            api_port = free_port()
            env = {**os.environ, "DICOM_GATEWAY_ADMIN_TOKEN": TOKEN,
                   "DICOM_GATEWAY_PSEUDONYM_SECRET": "bench-secret-0123456789abcdef",
                   "DICOM_GATEWAY_LOG_LEVEL": "WARNING"}
            api = subprocess.Popen([str(Path(sys.executable).parent / "dicom-gateway"), "api",
                                    "--data-dir", str(work / "ours"), "--http-port", str(api_port)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ours_url = f"http://127.0.0.1:{api_port}/dicom-web"
            try:
                wait_for(lambda: httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2)
                         .status_code == 200, timeout=60, what="dicom-gateway api")
                auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
                accept = {"Accept": "application/dicom+json"}
                with httpx.Client(timeout=120) as client:
                    _paired(client, (f"{ours_url}/studies?PatientID={target.patient_id}", auth),
                            (f"{url}/dicom-web/studies?PatientID=IPP-00042", accept), 50)  # warm-up
                    ours_pid, theirs_pid = _paired(
                        client, (f"{ours_url}/studies?PatientID={target.patient_id}", auth),
                        (f"{url}/dicom-web/studies?PatientID=IPP-00042", accept), requests)
                    # Each server in its own block, requests back to back (warm): the
                    # server's own cost, without the machine's wake-up after idle time.
                    ours_warm = _timings(client, f"{ours_url}/studies?PatientID={target.patient_id}", auth, requests)
                    theirs_warm = _timings(client, f"{url}/dicom-web/studies?PatientID=IPP-00042", accept, requests)
                    # The same by curl; our key goes to Orthanc too (its authentication is off).
                    curl_pair = (f"{ours_url}/studies?PatientID={target.patient_id}",
                                 f"{url}/dicom-web/studies?PatientID=IPP-00042")
                    curl_alternated = _curl_qido(*curl_pair, auth, 1000, True, work)
                    cpu_before = _cpu_seconds(api.pid), _cpu_seconds(process.pid)
                    curl_back_to_back = _curl_qido(*curl_pair, auth, 1000, False, work)
                    qido_cpu = [(_cpu_seconds(pid) - before) / 1000 * 1000
                                for pid, before in zip((api.pid, process.pid), cpu_before, strict=True)]
                    ours_all, theirs_all = _paired(
                        client, (f"{ours_url}/studies?limit=100", auth),
                        (f"{url}/dicom-web/studies?limit=100", accept), requests // 2)
                    wado = 'multipart/related; type="application/dicom"; transfer-syntax=*'
                    ours_auth = {"Authorization": f"Bearer {TOKEN}", "Accept": wado}
                    rounds = [(f"{ours_url}/studies/{big_series.study_instance_uid}/series/"
                               f"{big_series.series_instance_uid}", ours_auth),
                              (f"{ours_url}/studies/{plain_series.study_instance_uid}/series/"
                               f"{plain_series.series_instance_uid}", ours_auth),
                              (f"{url}/dicom-web/studies/{first.StudyInstanceUID}/"
                               f"series/{first.SeriesInstanceUID}", {"Accept": wado})]
                    # The default Accept (no transfer-syntax: Explicit VR Little Endian, the
                    # syntax these objects are stored in), as many clients send it.
                    default = 'multipart/related; type="application/dicom"'
                    rounds += [(rounds[1][0], {**ours_auth, "Accept": default}),
                               (rounds[2][0], {"Accept": default})]
                    # Alternated rounds, every retrieval kept: a pulling PACS lives with the
                    # typical and the sustained rate, not with the best one alone.
                    runs: list[list[tuple[int, float]]] = [[] for _ in rounds]
                    for round_number in range(RETRIEVE_ROUNDS + 2):
                        for position, (address, headers) in enumerate(rounds):
                            size, seconds = _retrieve_curl(address, headers)
                            if round_number >= 2:  # two warm-up rounds
                                runs[position].append((size, seconds))
                    # The servers' own CPU time per uncompressed retrieval, each alone.
                    retrieve_cpu = []
                    for pid, (address, headers) in ((api.pid, rounds[1]), (process.pid, rounds[2])):
                        before = _cpu_seconds(pid)
                        for _ in range(CPU_RETRIEVALS):
                            _retrieve_curl(address, headers)
                        retrieve_cpu.append((_cpu_seconds(pid) - before) / CPU_RETRIEVALS * 1000)
            finally:
                api.terminate()
                api.wait(timeout=30)
        print(f"same data in both ({len(files)} instances, {studies} studies; ours: `dicom-gateway api`):")
        print(f"  QIDO by PatientID, back to back  ours p50 {_pct(ours_warm, 50):6.2f} ms   "
              f"Orthanc p50 {_pct(theirs_warm, 50):6.2f} ms   (ours/Orthanc {_pct(ours_warm, 50) / _pct(theirs_warm, 50):.2f})")
        print(f"  QIDO by PatientID, alternated    ours p50 {_pct(ours_pid, 50):6.2f} ms   "
              f"Orthanc p50 {_pct(theirs_pid, 50):6.2f} ms   (ours/Orthanc {_pct(ours_pid, 50) / _pct(theirs_pid, 50):.2f})")
        for label, (mine, other) in (("back to back", curl_back_to_back), ("alternated  ", curl_alternated)):
            print(f"  QIDO by PatientID, curl, {label} ours p50 {statistics.median(mine):6.2f} ms   "
                  f"Orthanc p50 {statistics.median(other):6.2f} ms   "
                  f"(ours/Orthanc {statistics.median(mine) / statistics.median(other):.2f})")
        print(f"  server CPU per QIDO request (the back-to-back curl run): ours {qido_cpu[0]:5.2f} ms   "
              f"Orthanc {qido_cpu[1]:5.2f} ms   (ours/Orthanc {qido_cpu[0] / qido_cpu[1]:.2f})")
        print(f"  QIDO 100 studies, alternated     ours p50 {_pct(ours_all, 50):6.1f} ms   Orthanc p50 {_pct(theirs_all, 50):6.1f} ms"
              f"   (ours/Orthanc {_pct(ours_all, 50) / _pct(theirs_all, 50):.2f})")
        print(f"  series retrieve, 50 CT 512x512, transfer-syntax=* (as stored) unless said, curl, "
              f"{RETRIEVE_ROUNDS} rounds alternated:")
        for label, samples in zip(("ours, stored JPEG-LS", "ours, stored uncompressed",
                                   "Orthanc, uncompressed", "ours, uncompressed, default Accept",
                                   "Orthanc, default Accept"), runs, strict=True):
            times = sorted(seconds for _size, seconds in samples)
            size = samples[0][0]
            sustained = sum(s for s, _t in samples) / 1e6 / sum(times)
            print(f"    {label:<34} {size / 1e6:5.1f} MB  best {times[0] * 1000:5.1f} ms  "
                  f"p50 {statistics.median(times) * 1000:5.1f} ms  p90 {_pct(times, 90) * 1000:5.1f} ms  "
                  f"sustained {sustained:7.1f} MB/s (best {size / 1e6 / times[0]:7.1f})")
        print(f"    server CPU per uncompressed retrieval ({CPU_RETRIEVALS} each): ours {retrieve_cpu[0]:5.1f} ms   "
              f"Orthanc {retrieve_cpu[1]:5.1f} ms   (ours/Orthanc {retrieve_cpu[0] / retrieve_cpu[1]:.2f})")
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
