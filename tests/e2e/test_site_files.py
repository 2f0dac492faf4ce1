"""Site files closed: whatever holds identified data at a site (spool, quarantine, embedded
broker, STOW-RS uploads, secrets, the SQLite index) is its owner's only — files 0600, folders
0700 — under the common umask 022, and what an older version left wider is tightened at
start-up. Through `dicom-gateway serve`, dcmtk's storescu and a real STOW-RS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pydicom

from gateway.sample_study import SampleStudySpec
from tests.support.files import file_mode
from tests.support.services import GatewayProcess, free_port, gateway_command, gateway_env, wait_for

SECRET = "site-files-pseudonym-secret-0123456789"
TOKEN = "site-files-admin-token-0123456789abcdef"
US_WITH_TEXT = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds" / "GREYSCALE_IMAGE.dcm"


def _legacy_data_dir(data_dir: Path) -> Path:
    """A data dir as an older version left it: everything by the umask (0755/0644)."""
    legacy = data_dir / "quarantine" / "site1" / "legacy-batch"
    legacy.mkdir(parents=True)
    (legacy / "1.2.3.4.dcm").write_bytes(US_WITH_TEXT.read_bytes())
    (legacy / "1.2.3.4.dcm.reason.json").write_text(json.dumps({"reason": "Legacy"}))
    (data_dir / "spool" / "site1").mkdir(parents=True)
    (data_dir / "secrets.json").write_text(json.dumps({"pseudonym_secret": SECRET,
                                                       "admin_token": TOKEN}))
    for path in (legacy / "1.2.3.4.dcm", data_dir / "secrets.json"):
        assert file_mode(path) == 0o644
    return legacy


def _stow(http_port: int, path: Path) -> httpx.Response:
    boundary = "site-files-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    return httpx.post(f"http://127.0.0.1:{http_port}/dicom-web/studies", content=body,
                      headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json",
                               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
                      timeout=60)


def test_identified_site_files_are_owner_only_under_umask_022(
        tmp_path: Path, umask_022: None, dcmtk: dict[str, str],
        sample_study: tuple[Path, SampleStudySpec]) -> None:
    folder, spec = sample_study
    data_dir = tmp_path / "data"
    legacy = _legacy_data_dir(data_dir)
    quarantining = tmp_path / "to-quarantine"
    quarantining.mkdir()
    (quarantining / "us.dcm").write_bytes(US_WITH_TEXT.read_bytes())  # burned-in text: quarantined
    stowed = pydicom.dcmread(US_WITH_TEXT)
    stowed.SOPInstanceUID = pydicom.uid.generate_uid()
    stowed.save_as(tmp_path / "stow.dcm", enforce_file_format=True)
    dicom_port, http_port = free_port(), free_port()
    command = gateway_command("serve", "--data-dir", str(data_dir), "--dicom-port",
                              str(dicom_port), "--http-port", str(http_port))
    with GatewayProcess(command, gateway_env(data_dir), tmp_path / "serve.log") as serve:
        wait_for(lambda: "dicom-gateway is ready" in serve.log_text() or not serve.alive(),
                 timeout=120, what="serve to be ready")
        assert serve.alive(), serve.log_text()
        for source in (folder, quarantining):
            sent = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "+sd", "+r", "127.0.0.1",
                                   str(dicom_port), str(source)], check=False, capture_output=True,
                                  timeout=120)
            assert sent.returncode == 0, sent.stderr.decode(errors="replace")
        # burned-in text and no mask: not stored, and the STOW-RS answer says so (0x0124)
        answer = _stow(http_port, tmp_path / "stow.dcm")
        assert answer.status_code == 409, answer.text
        assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]

        def settled() -> bool:
            reasons = list((data_dir / "quarantine").rglob("*.reason.json"))
            spooled = list((data_dir / "spool").rglob("*.dcm"))
            objects = list((data_dir / "objects").rglob("*.dcm"))
            return len(reasons) == 3 and not spooled and len(objects) >= spec.ct_slices + spec.mr_slices

        wait_for(settled, timeout=120, interval=0.2, what="the study stored and two instances quarantined")
        serve.stop()
    identified = [data_dir / name for name in ("spool", "quarantine", "broker")]
    checked = 0
    for root in identified:
        assert file_mode(root) == 0o700, root
        for path in root.rglob("*"):
            if path.is_symlink():
                continue
            expected = 0o700 if path.is_dir() else 0o600
            assert file_mode(path) == expected, f"{path.relative_to(data_dir)} is {oct(file_mode(path))}"
            checked += 1
    assert checked > 10
    assert file_mode(legacy) == 0o700 and file_mode(legacy / "1.2.3.4.dcm") == 0o600  # tightened at start
    assert (data_dir / "spool" / ".incoming").is_dir()  # the STOW-RS upload folder was used
    assert file_mode(data_dir / "secrets.json") == 0o600
    index_files = [p for p in data_dir.glob("index.sqlite3*")]
    assert data_dir / "index.sqlite3" in index_files
    for path in index_files:
        assert file_mode(path) == 0o600, f"{path.name} is {oct(file_mode(path))}"
    # De-identified objects: written through mkstemp, owner-only as well.
    objects = list((data_dir / "objects").rglob("*.dcm"))
    assert objects and {file_mode(p) for p in objects} == {0o600}


def test_a_new_data_dir_and_its_secrets_are_owner_only(tmp_path: Path, umask_022: None) -> None:
    """`serve` generates the secrets: the data dir it creates is 0700, the file 0600; the
    SQLite index and its WAL companions are created 0600 before SQLite opens them."""
    from gateway.components import build_index
    from gateway.settings import Settings

    data_dir = tmp_path / "fresh" / "data"
    settings = Settings(data_dir=data_dir)
    settings.ensure_generated_secrets()
    assert file_mode(data_dir) == 0o700
    assert file_mode(data_dir / "secrets.json") == 0o600
    index = build_index(settings)
    with index.engine.connect() as connection:  # WAL: -wal and -shm exist while connected
        connection.exec_driver_sql("SELECT count(*) FROM studies").all()
        files = {p.name: file_mode(p) for p in data_dir.glob("index.sqlite3*")}
    index.engine.dispose()
    assert {"index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"} <= set(files)
    assert set(files.values()) == {0o600}, files
