"""STOW-RS read-after-write latency and STOW throughput through real servers on loopback:
our `dicom-gateway serve` (embedded column) as of now and as of another checkout (`--before`,
e.g. the tree before issue 18), and Debian's Orthanc with its DICOMweb plugin (`--orthanc`).

All servers run side by side for the whole run and get the same generated 512x512 16-bit CT
instances, taking turns (alternated, the order reversed every other round). Per round and
server:

- read-after-write: N single-instance STOW-RS requests, one after the other (one study);
  for each, the time until the answer, and until a QIDO-RS search for the stored SOP
  Instance UID (`GET /dicom-web/instances?SOPInstanceUID=`, polled every 5 ms from the
  answer on, as a client would) finds it; and whether the search right after the answer
  found it. Our stored UID is the site's pseudonym of the UID sent (the same secret for
  every gateway); Orthanc stores the UID as sent.
- throughput: one STOW-RS request of 50 instances (one study), then 4 clients at once each
  sending 25 (one study each): instances/s until every answer, and until every instance
  is searchable (QIDO-RS counts each study's instances every 50 ms once answered).

Run: python benchmarks/stow.py [--rounds 5] [--before ../before] [--orthanc]   (about 2.5 min)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import pydicom
from ingest import running_serve

from anonymize import PseudonymKeys
from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.support.orthanc import Orthanc

SECRET = "stow-benchmark-pseudonym-secret-0123456789"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
BOUNDARY = "stow-benchmark-boundary"
SEARCH_INTERVAL = 0.005      # read-after-write: as fast as a client would poll
COUNT_INTERVAL = 0.05        # throughput: counting a study's instances
ONE_REQUEST, CLIENTS, PER_CLIENT = 50, 4, 25
WARM_UP = 4                  # single-instance requests per server before the rounds


@dataclass(frozen=True)
class Instance:
    """One generated instance: its bytes and the UIDs it was sent under."""

    body: bytes
    study: str
    sop: str


@dataclass(frozen=True)
class Sample:
    """One single-instance STOW-RS: seconds from sending until the answer and until a search
    found the instance, whether the search right after the answer found it, and whether the
    answer named the stored SOP Instance UID."""

    answered: float
    searchable: float
    found_at_once: bool
    names_stored: bool


@dataclass
class Server:
    """A STOW-RS / QIDO-RS endpoint and how it names what it stored."""

    name: str
    dicomweb: str
    headers: dict[str, str]
    stored_uid: Callable[[str], str]
    samples: list[Sample] = field(default_factory=list)
    first_use: Sample | None = None
    #: Per round: (instances/s answered, instances/s searchable).
    one_request: list[tuple[float, float]] = field(default_factory=list)
    concurrent: list[tuple[float, float]] = field(default_factory=list)


def _study(folder: Path, seed: int, slices: int) -> list[Instance]:
    paths = write_sample_study(folder / f"s{seed}", SampleStudySpec(ct_slices=slices, mr_slices=0, seed=seed))
    instances = []
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        instances.append(Instance(path.read_bytes(), header.StudyInstanceUID, header.SOPInstanceUID))
    return instances


def _multipart(instances: list[Instance]) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + i.body + b"\r\n"
             for i in instances]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _store(client: httpx.Client, server: Server, body: bytes) -> httpx.Response:
    response = client.post(f"{server.dicomweb}/studies", content=body, headers={
        **server.headers, "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    if response.status_code not in (200, 202):
        sys.exit(f"{server.name}: STOW-RS answered {response.status_code}: {response.text[:500]}")
    return response


def _found(client: httpx.Client, server: Server, sop: str) -> bool:
    response = client.get(f"{server.dicomweb}/instances", params={"SOPInstanceUID": sop},
                          headers={**server.headers, "Accept": "application/dicom+json"})
    response.raise_for_status()
    return response.status_code == 200 and bool(response.content) and bool(response.json())


def _read_after_write(client: httpx.Client, server: Server, instance: Instance) -> Sample:
    """One single-instance STOW-RS, then searching for it until found."""
    body = _multipart([instance])
    stored = server.stored_uid(instance.sop)
    started = time.perf_counter()
    response = _store(client, server, body)
    answered = time.perf_counter() - started
    at_once = found = _found(client, server, stored)
    while not found:
        if time.perf_counter() - started > 120:
            sys.exit(f"{server.name}: {stored} not searchable within 120 s")
        time.sleep(SEARCH_INTERVAL)
        found = _found(client, server, stored)
    searchable = time.perf_counter() - started
    return Sample(answered, searchable, at_once, _names_stored(server, response, instance))


def _names_stored(server: Server, response: httpx.Response, instance: Instance) -> bool:
    """Whether the answer names the UID the instance is stored under (ours since issue 18,
    Orthanc) rather than the UID as sent (ours before). Anything else means our computed
    pseudonym is not what the site stored: the figures would be wrong."""
    named = [item["00081155"]["Value"][0] for item in response.json()["00081199"]["Value"]]
    stored = server.stored_uid(instance.sop)
    if named not in ([stored], [instance.sop]):
        sys.exit(f"{server.name}: STOW-RS answer names {named}, stored as {stored}")
    return named == [stored]


def _searchable_count(client: httpx.Client, server: Server, study: str) -> int:
    response = client.get(f"{server.dicomweb}/studies/{study}/instances", params={"limit": 1000},
                          headers={**server.headers, "Accept": "application/dicom+json"})
    if response.status_code in (204, 404):
        return 0
    response.raise_for_status()
    return len(response.json()) if response.content else 0


def _throughput(server: Server, requests: list[list[Instance]]) -> tuple[float, float]:
    """The requests sent at once, one client each: (instances/s until every answer,
    instances/s until every instance is searchable)."""
    bodies = [_multipart(instances) for instances in requests]
    total = sum(len(instances) for instances in requests)
    expected: dict[str, int] = {}
    for instances in requests:
        for instance in instances:
            stored_study = server.stored_uid(instance.study)
            expected[stored_study] = expected.get(stored_study, 0) + 1

    def send(body: bytes) -> None:
        with httpx.Client(timeout=600) as client:
            _store(client, server, body)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(send, bodies))
    answered = time.perf_counter() - started
    with httpx.Client(timeout=60) as client:
        waiting = dict(expected)
        while waiting:
            for study, count in list(waiting.items()):
                if _searchable_count(client, server, study) >= count:
                    del waiting[study]
            if waiting:
                if time.perf_counter() - started > 600:
                    sys.exit(f"{server.name}: not searchable within 600 s")
                time.sleep(COUNT_INTERVAL)
    searchable = time.perf_counter() - started
    return total / answered, total / searchable


def _round_data(folder: Path, number: int, single: int) -> tuple[list[Instance], list[Instance], list[list[Instance]]]:
    seed = 1000 * (number + 1)
    return (_study(folder, seed, single), _study(folder, seed + 1, ONE_REQUEST),
            [_study(folder, seed + 2 + k, PER_CLIENT) for k in range(CLIENTS)])


def _pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--single", type=int, default=30,
                        help="single-instance STOW-RS requests per round and server")
    parser.add_argument("--before", type=Path, help="another checkout to compare with this one "
                        "(e.g. a worktree at 8671d10, before issue 18)")
    parser.add_argument("--orthanc", action="store_true",
                        help="also Debian's Orthanc + DICOMweb plugin, transcoding to JPEG-LS on ingest")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.rounds < 1 or args.single * args.rounds < 2:
        parser.error("percentiles need at least two single-instance requests in all")

    work = Path(tempfile.mkdtemp(prefix="dgw-stow-"))
    keys = PseudonymKeys(SECRET.encode())
    settings = {"DICOM_GATEWAY_PSEUDONYM_SECRET": SECRET,
                # studies are completed (metadata, thumbnails, KOS) after the run, not during it
                "DICOM_GATEWAY_WORKER__STUDY_QUIET_SECONDS": "3600"}
    trees = [("before", args.before.resolve()), ("after", ROOT)] if args.before else [("ours", ROOT)]
    servers: list[Server] = []
    try:
        with ExitStack() as stack:
            for name, tree in trees:
                (work / name).mkdir()
                serve = stack.enter_context(running_serve(work / name, settings, tree))
                servers.append(Server(name, f"http://127.0.0.1:{serve.http_port}/dicom-web",
                                      {"Authorization": f"Bearer {serve.token}"}, keys.uid))
            if args.orthanc:
                orthanc = Orthanc(work / "orthanc", {})
                orthanc.config.update({"Name": "bench", "IngestTranscoding": JPEG_LS_LOSSLESS})
                stack.enter_context(orthanc)
                servers.append(Server("Orthanc", f"{orthanc.url}/dicom-web", {}, lambda uid: uid))
            clients = {s.name: stack.enter_context(httpx.Client(timeout=600)) for s in servers}

            # The first request after start is what a site sees first; a few more warm every
            # worker process (each loads its context on its first batch) before the rounds.
            warm_up = _study(work / "data", 1, WARM_UP)
            for server in servers:
                server.first_use = _read_after_write(clients[server.name], server, warm_up[0])
                for instance in warm_up[1:]:
                    _read_after_write(clients[server.name], server, instance)
            for number in range(args.rounds):
                single, one_request, concurrent = _round_data(work / "data", number, args.single)
                order = servers if number % 2 == 0 else servers[::-1]
                for server in order:
                    for instance in single:
                        server.samples.append(_read_after_write(clients[server.name], server, instance))
                for server in order:
                    server.one_request.append(_throughput(server, [one_request]))
                for server in order:
                    server.concurrent.append(_throughput(server, concurrent))
                shutil.rmtree(work / "data")
                print(f"round {number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    _report(servers, args)


def _report(servers: list[Server], args: argparse.Namespace) -> None:
    print(f"STOW-RS of 512x512 16-bit CT, {args.rounds} alternated rounds. Ours: `dicom-gateway serve` "
          "(SQLite, filesystem objects and broker, JPEG-LS)"
          + ("; Orthanc: IngestTranscoding JPEG-LS lossless, SQLite, files on disk" if args.orthanc else ""))
    print(f"\nread-after-write: {args.single} single-instance requests per round and server "
          f"({args.single * args.rounds} each); QIDO-RS polled every {SEARCH_INTERVAL * 1000:.0f} ms")
    print(f"{'server':<8} {'answer p50':>10} {'p90':>6}   {'searchable p50':>14} {'p90':>6}   "
          f"{'found right after the answer':>28}   {'answer names the stored UID':>27}")
    for s in servers:
        answers = [x.answered for x in s.samples]
        searchable = [x.searchable for x in s.samples]
        at_once = sum(x.found_at_once for x in s.samples)
        named = sum(x.names_stored for x in s.samples)
        print(f"{s.name:<8} {_pct(answers, 50):7.1f} ms {_pct(answers, 90):6.1f}   "
              f"{_pct(searchable, 50):11.1f} ms {_pct(searchable, 90):6.1f}   "
              f"{f'{at_once}/{len(s.samples)} ({at_once / len(s.samples):.0%})':>28}   "
              f"{f'{named}/{len(s.samples)}':>27}")
    print("first request after start, answer / searchable:  " + ";  ".join(
        f"{s.name} {s.first_use.answered * 1000:.0f} / {s.first_use.searchable * 1000:.0f} ms"
        for s in servers if s.first_use))
    print(f"\nthroughput, instances/s, median of the rounds [min-max]; searchable: counted every "
          f"{COUNT_INTERVAL * 1000:.0f} ms once answered")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):5.1f} [{min(values):.1f}-{max(values):.1f}]"

    print(f"{'server':<8} {f'1 request x {ONE_REQUEST}: answered':>26} {'searchable':>18}   "
          f"{f'{CLIENTS} clients x {PER_CLIENT}: answered':>26} {'searchable':>18}")
    for s in servers:
        print(f"{s.name:<8} {cell([a for a, _ in s.one_request]):>26} {cell([b for _, b in s.one_request]):>18}   "
              f"{cell([a for a, _ in s.concurrent]):>26} {cell([b for _, b in s.concurrent]):>18}")


if __name__ == "__main__":
    main()
