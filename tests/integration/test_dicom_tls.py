"""DICOM over TLS (PS3.15 Annex B) with dcmtk's storescu/echoscu +tls / +tla."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dicom_node import CallerPolicy, DicomNode, NodeConfig, TlsConfig


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("Test Regional CA", ca_key, _name("Test Regional CA"), ca_key, ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {}
    _, files["ca"] = _write(tmp_path, "ca", ca_key, ca)
    files["server_key"], files["server"] = _write(tmp_path, "server", server_key,
                                                  _issue("gateway", server_key, ca.subject, ca_key))
    files["client_key"], files["client"] = _write(tmp_path, "client", client_key,
                                                  _issue("modality", client_key, ca.subject, ca_key))
    files["rogue_key"], files["rogue"] = _write(tmp_path, "rogue", rogue_key,
                                                _issue("rogue", rogue_key, _name("rogue"), rogue_key))
    return files


def _node(tmp_path: Path, tls: TlsConfig) -> DicomNode:
    from tests.support.services import free_port

    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=CallerPolicy.build(["127.0.0.0/8"]), tls=tls)
    return DicomNode(config, lambda site, batch: None)


@pytest.fixture
def tls_node(tmp_path: Path, pki: dict[str, Path]) -> Iterator[DicomNode]:
    node = _node(tmp_path, TlsConfig(pki["server"], pki["server_key"], pki["ca"],
                                     require_client_certificate=True))
    node.start()
    yield node
    node.stop()


def _storescu(dcmtk: dict[str, str], node: DicomNode, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk["storescu"], *tls, "-aec", "DICOMGATEWAY", "127.0.0.1", str(node.port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)


def test_storescu_over_tls_with_a_client_certificate(dcmtk: dict[str, str], tls_node: DicomNode,
                                                     pki: dict[str, Path],
                                                     sample_study: tuple[Path, object]) -> None:
    files = sorted(sample_study[0].rglob("*.dcm"))[:3]
    result = _storescu(dcmtk, tls_node, files, "+tls", str(pki["client_key"]), str(pki["client"]),
                       "+cf", str(pki["ca"]))
    assert result.returncode == 0, result.stderr
    assert len(list(tls_node.spool.site_dir.glob("*/*.dcm"))) == 3


def test_tls_node_refuses_plain_tcp_unknown_and_missing_client_certificates(
        dcmtk: dict[str, str], tls_node: DicomNode, pki: dict[str, Path],
        sample_study: tuple[Path, object]) -> None:
    files = sorted(sample_study[0].rglob("*.dcm"))[:1]
    assert _storescu(dcmtk, tls_node, files).returncode != 0
    assert _storescu(dcmtk, tls_node, files, "+tla", "+cf", str(pki["ca"])).returncode != 0
    assert _storescu(dcmtk, tls_node, files, "+tls", str(pki["rogue_key"]), str(pki["rogue"]),
                     "+cf", str(pki["ca"])).returncode != 0
    assert not list(tls_node.spool.site_dir.glob("*/*.dcm"))


def test_anonymous_client_when_client_certificates_are_not_required(
        dcmtk: dict[str, str], tmp_path: Path, pki: dict[str, Path]) -> None:
    node = _node(tmp_path, TlsConfig(pki["server"], pki["server_key"]))
    node.start()
    try:
        echo = subprocess.run([dcmtk["echoscu"], "+tla", "+cf", str(pki["ca"]), "-aec", "DICOMGATEWAY",
                               "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        # the client checks the node's certificate: without the CA it refuses to talk
        untrusted = subprocess.run([dcmtk["echoscu"], "+tla", "-aec", "DICOMGATEWAY", "127.0.0.1",
                                    str(node.port)], capture_output=True, text=True, timeout=30)
        assert untrusted.returncode != 0
    finally:
        node.stop()


def test_an_ae_title_bound_to_a_certificate_subject_needs_that_certificate(
        dcmtk: dict[str, str], tmp_path: Path, pki: dict[str, Path],
        sample_study: tuple[Path, object]) -> None:
    """DICOM__CALLERS' certificate_subject: PACS_A is honoured only with the CA-verified
    certificate "CN=modality"; anonymously, or with another valid certificate, the
    association is rejected (and audited); other AE titles may still come anonymously."""
    from storage import AccessRepository, AuditQuery, AuditWriter, create_index_engine, migrate
    from tests.support.services import free_port

    from dicom_node import CallerCredential, Right

    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki["ca"].read_bytes())
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    other = _write(tmp_path, "other", other_key, _issue("other-modality", other_key, ca.subject, ca_key))
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    access = AccessRepository(engine)
    policy = CallerPolicy.build(["127.0.0.0/8"], callers={"PACS_A": CallerCredential(
        frozenset({"site1"}), frozenset(Right), certificate_subject="CN=modality")})
    config = NodeConfig(ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id="site1",
                        spool_root=tmp_path / "spool", policy=policy,
                        tls=TlsConfig(pki["server"], pki["server_key"], pki["ca"]))
    writer = AuditWriter(access)
    node = DicomNode(config, lambda site, batch: None, audit=writer)
    node.start()
    try:
        files = sorted(sample_study[0].rglob("*.dcm"))[:1]
        as_pacs_a = ("-aet", "PACS_A", "+cf", str(pki["ca"]))
        anonymous = _storescu(dcmtk, node, files, "+tla", *as_pacs_a)
        assert anonymous.returncode != 0 and "Association Rejected" in anonymous.stderr
        wrong = _storescu(dcmtk, node, files, "+tls", str(other[0]), str(other[1]), *as_pacs_a)
        assert wrong.returncode != 0 and "Association Rejected" in wrong.stderr
        assert not list(node.spool.site_dir.glob("*/*.dcm"))
        right = _storescu(dcmtk, node, files, "+tls", str(pki["client_key"]), str(pki["client"]),
                          *as_pacs_a)
        assert right.returncode == 0, right.stderr
        assert len(list(node.spool.site_dir.glob("*/*.dcm"))) == 1
        echo = subprocess.run([dcmtk["echoscu"], "+tla", "+cf", str(pki["ca"]), "-aet", "ANOTHER",
                               "-aec", "DICOMGATEWAY", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
    finally:
        node.stop()
    writer.flush()
    refused = access.search_audit(AuditQuery(actions=("dimse.refused",)))
    assert len(refused) == 2 and all(e.actor == "ae:PACS_A" and e.outcome == 4 for e in refused)
