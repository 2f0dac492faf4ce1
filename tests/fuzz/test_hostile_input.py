"""Hostile and broken input against a running `dicom-gateway serve` (issue 19): every attack
gets a clear answer — a DIMSE failure status, or a JSON 4xx — and costs little: no process
of the gateway (node, worker and its pool, API) grows by more than 300 MB over the peak it
reached doing normal work, and the gateway answers normally right after.

The figures (each process's peak before and after) are printed: run with `-s` to see them."""

from __future__ import annotations

import http.client
import io
import json
import signal
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pynetdicom
import pytest
from pynetdicom import AE

from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.support.bombs import deflated_bomb
from tests.support.process_memory import peaks
from tests.support.services import GatewayProcess, free_port, gateway_command, gateway_env, wait_for

TOKEN = "hostile-admin-token-0123456789abcdef"
SECRET = "hostile-pseudonym-secret-0123456789abcdef"
ALLOWED_GROWTH = 300 * 1024 * 1024


class Gateway:
    def __init__(self, serve: GatewayProcess, dicom_port: int, http_port: int, data_dir: Path) -> None:
        self.serve, self.dicom_port, self.data_dir = serve, dicom_port, data_dir
        self.root = f"http://127.0.0.1:{http_port}"
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.study = self.series = self.sop = self.share = ""
        self.baseline: dict[int, tuple[str, int]] = {}
        self.studies = 1  # stored by the normal work (and by an admitted instance)

    @property
    def pid(self) -> int:
        assert self.serve.process is not None
        return self.serve.process.pid

    def get(self, path: str, *, params: dict[str, str] | None = None,
            headers: dict[str, str] | None = None, credentials: bool = True) -> httpx.Response:
        sent = {**(self.headers if credentials else {}), **(headers or {})}
        return httpx.get(f"{self.root}{path}", params=params, headers=sent, timeout=120)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("hostile")
    data_dir = root / "data"
    dicom_port, http_port = free_port(), free_port()
    # The bomb declares 256 MiB: under the default 1 GiB per instance (a real modality may
    # need that), so this gateway is configured tighter, as a site would for its modalities.
    env = gateway_env(data_dir, admin_token=TOKEN, pseudonym_secret=SECRET,
                      worker__study_quiet_seconds="1", limits__max_decoded_instance_mb="128")
    command = gateway_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(dicom_port),
                              "--http-port", str(http_port))
    with GatewayProcess(command, env, root / "serve.log") as serve:
        wait_for(lambda: "dicom-gateway is ready" in serve.log_text() or not serve.alive(),
                 timeout=120, what="serve to be ready")
        assert serve.alive(), serve.log_text()
        running = Gateway(serve, dicom_port, http_port, data_dir)
        _normal_work(running, root)
        running.baseline = peaks(running.pid)
        yield running
        serve.stop(signal.SIGINT, timeout=60)


def _normal_work(gateway: Gateway, root: Path) -> None:
    """What a working day does: a study in (one value with control characters, which XML
    cannot carry), searched, retrieved, rendered, shared — every process reaches its peak."""
    paths = write_sample_study(root / "study", SampleStudySpec(ct_slices=4, mr_slices=2, ct_size=256))
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.Manufacturer = "ACME\x01\x02 Medical"  # kept by the profile, not valid XML
        dataset.save_as(path)
    _c_store(gateway, paths)
    wait_for(lambda: _instances(gateway) == 6, timeout=120, what="the study indexed")
    [study] = gateway.get("/dicom-web/studies").json()
    gateway.study = study["0020000D"]["Value"][0]
    instances = gateway.get(f"/dicom-web/studies/{gateway.study}/instances").json()
    first = next(i for i in instances if i["00080060"]["Value"] == ["CT"])
    gateway.series, gateway.sop = first["0020000E"]["Value"][0], first["00080018"]["Value"][0]
    assert gateway.get(f"/dicom-web/studies/{gateway.study}").status_code == 200
    assert gateway.get(f"{_instance(gateway)}/rendered").status_code == 200
    assert gateway.get(f"{_instance(gateway)}/frames/1").status_code == 200
    created = httpx.post(f"{gateway.root}/api/shares", headers=gateway.headers, timeout=30,
                         json={"study_uids": [gateway.study], "expires_in": 3600})
    assert created.status_code == 201, created.text
    gateway.share = created.json()["token"]


def _instances(gateway: Gateway) -> int:
    answer = gateway.get("/dicom-web/instances")
    return len(answer.json()) if answer.status_code == 200 and answer.content else 0


def _instance(gateway: Gateway, prefix: str = "/dicom-web") -> str:
    return f"{prefix}/studies/{gateway.study}/series/{gateway.series}/instances/{gateway.sop}"


def _c_store(gateway: Gateway, paths: list[Path]) -> list[int]:
    """C-STORE files as they are on disk, in their own transfer syntax (never re-encoded:
    what a hostile sender puts on the wire); the statuses."""
    ae = AE(ae_title="HOSTILE")
    for pair in {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
                 for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)}:
        ae.add_requested_context(pair[0], [pair[1]])
    previous = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", gateway.dicom_port, ae_title="DICOMGATEWAY")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(path).Status) for path in paths]
        assoc.release()
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def _json_error(answer: httpx.Response, *statuses: int) -> None:
    assert answer.status_code in statuses, (answer.status_code, answer.text[:300])
    body = answer.json()
    assert body["error"]["code"] and body["error"]["message"], body


def _stow(gateway: Gateway, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(f"{gateway.root}/dicom-web/studies", content=body, timeout=120,
                      headers={**gateway.headers, "Accept": "application/dicom+json",
                               "Content-Type": content_type})


def test_a_deflate_bomb_by_c_store_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    deflated_bomb(bomb)
    assert bomb.stat().st_size < 1 << 20  # gigabytes declared, a few hundred kilobytes sent
    [status] = _c_store(gateway, [bomb])
    assert status != 0x0000 and status >> 12 in (0xA, 0xC), hex(status)  # a failure status
    assert _instances(gateway) == 6


def test_a_deflate_bomb_by_stow_is_a_failed_instance(gateway: Gateway, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    deflated_bomb(bomb)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + bomb.read_bytes() + b"\r\n--b--\r\n"
    answer = _stow(gateway, body, 'multipart/related; type="application/dicom"; boundary=b')
    assert answer.status_code == 409, answer.text[:300]
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"][0] in (0xA700, 0xC000, 0x0124)
    assert not list((gateway.data_dir / "spool" / ".incoming").glob("*"))


@pytest.mark.parametrize("prefix", ["/dicom-web", "share"])
def test_a_frame_repeated_thousands_of_times_costs_one_frame(gateway: Gateway, prefix: str) -> None:
    root = f"/s/{gateway.share}/dicom-web" if prefix == "share" else prefix
    shared = prefix == "share"  # a share link without PIN: no credentials at all
    one = gateway.get(f"{_instance(gateway, root)}/frames/1", credentials=not shared)
    assert one.status_code == 200
    many = gateway.get(f"{_instance(gateway, root)}/frames/" + ",".join(["1"] * 2000),
                       credentials=not shared)
    if many.status_code == 200:  # de-duplicated: the frame once
        assert len(many.content) <= len(one.content) + 1024
    else:
        _json_error(many, 400)


@pytest.mark.parametrize("path", ["/dicom-web/studies?PatientID=", "/s/{share}/dicom-web/studies?x=",
                                  "/s/{share}?x="])
@pytest.mark.parametrize("length", [60_000, 120_000])
def test_a_huge_url_is_refused(gateway: Gateway, path: str, length: int) -> None:
    """Long URLs, sent by a plain HTTP/1.1 client (httpx refuses to build them): 414 with the
    JSON error body; past the HTTP parser's own limit (about 64 KiB of request line), its
    400 — a clear answer either way, never a 200 or a dropped connection."""
    connection = http.client.HTTPConnection(gateway.root.removeprefix("http://"), timeout=60)
    try:
        connection.request("GET", path.format(share=gateway.share) + "x" * length,
                           headers=gateway.headers)
        answer = connection.getresponse()
        status, body = answer.status, answer.read()
    finally:
        connection.close()
    if length < 64 * 1024:
        assert status == 414, (status, body[:300])
        assert json.loads(body)["error"]["code"]
    else:
        assert status in (400, 414), (status, body[:300])


@pytest.mark.parametrize("via", ["credentials", "share"])
def test_an_offset_beyond_any_integer_is_400(gateway: Gateway, via: str) -> None:
    root = f"/s/{gateway.share}/dicom-web" if via == "share" else "/dicom-web"
    answer = gateway.get(f"{root}/studies", params={"offset": str(2**64)},
                         credentials=via == "credentials")
    _json_error(answer, 400)


def test_a_boundary_longer_than_rfc_2046_allows_is_400(gateway: Gateway) -> None:
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nx\r\n--{boundary}--\r\n".encode()
    answer = _stow(gateway, body, f'multipart/related; type="application/dicom"; boundary={boundary}')
    _json_error(answer, 400)


def test_dicom_json_nested_thousands_deep_is_refused_and_leaves_nothing(gateway: Gateway) -> None:
    depth = 5000  # written as text: json.dumps itself cannot nest this deep
    document = ('{"00400275": {"vr": "SQ", "Value": [' * depth + '{"00100010": {"vr": "PN"}}'
                + "]}}" * depth)
    body = (b"--j\r\nContent-Type: application/dicom+json\r\n\r\n[" + document.encode()
            + b"]\r\n--j--\r\n")
    answer = _stow(gateway, body, 'multipart/related; type="application/dicom+json"; boundary=j')
    assert 400 <= answer.status_code < 500, answer.text[:300]
    assert not list((gateway.data_dir / "spool" / ".incoming").glob("*"))


def test_xml_answers_are_well_formed_whatever_the_values(gateway: Gateway) -> None:
    answer = gateway.get(f"{_instance(gateway)}/metadata",
                         headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert answer.status_code == 200
    boundary = answer.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = [p for p in answer.content.split(b"--" + boundary.encode()) if b"<" in p]
    assert parts
    for part in parts:
        ET.fromstring(part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0])  # well-formed


def test_a_bomb_within_the_limits_is_stored_frame_by_frame(gateway: Gateway, tmp_path: Path) -> None:
    """A small file declaring 96 MiB (three 4096x4096 16-bit frames), under this gateway's
    128 MiB limit: admitted, compressed and stored. The worker holds the pixels once and
    works one frame at a time, so what it costs stays within the growth every process is
    allowed (checked by the test below, with every other attack)."""
    bomb = tmp_path / "admitted.dcm"
    deflated_bomb(bomb, 4096, 4096, 3)
    [status] = _c_store(gateway, [bomb])
    assert status == 0x0000, hex(status)
    gateway.studies += 1
    wait_for(lambda: _instances(gateway) == 7, timeout=120, what="the admitted instance indexed")
    [stored] = [i for i in gateway.get("/dicom-web/instances").json()
                if i.get("00280010", {}).get("Value") == [4096]]
    assert stored["00280008"]["Value"] == [3]
    assert stored["00083002"]["Value"][0] in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.201")


def test_after_every_attack_it_answers_normally_and_no_process_grew(gateway: Gateway) -> None:
    """Runs last in this module: the attacks above are done."""
    assert gateway.get("/healthz").status_code == 200
    assert len(gateway.get("/dicom-web/studies").json()) == gateway.studies
    retrieved = gateway.get(_instance(gateway), headers={"Accept": "application/dicom"})
    assert retrieved.status_code == 200
    assert pydicom.dcmread(io.BytesIO(retrieved.content)).SOPInstanceUID == gateway.sop
    after = peaks(gateway.pid)
    print("\npeak resident memory per process (MB): component, after normal work -> after the attacks")
    for pid, (component, peak) in sorted(after.items(), key=lambda item: item[1][0]):
        before = gateway.baseline.get(pid, (component, 0))[1]
        print(f"  {component:7s} pid {pid}: {before / 2**20:8.1f} -> {peak / 2**20:8.1f}")
    grown = {pid: (component, peak - gateway.baseline.get(pid, (component, 0))[1])
             for pid, (component, peak) in after.items() if pid in gateway.baseline}
    assert grown, "no process of the gateway was measured"
    assert all(growth <= ALLOWED_GROWTH for _, growth in grown.values()), grown
