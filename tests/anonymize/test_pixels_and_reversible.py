"""Clean Pixel Data policy on real ultrasound with burned-in text, and reversible
de-identification checked with the reidentify command and with `openssl cms`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from anonymize import (
    BurnedInAnnotationRisk,
    DeidentificationPolicy,
    PixelMask,
    PixelPolicy,
    PseudonymKeys,
    deidentify,
)
from gateway.sample_study import PlantedIdentity, SampleStudySpec, build_sample_study
from imaging import encode_dataset

SECRET = b"pixels-test-secret-0123456789abcdef"
US_DIR = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds"
GREYSCALE = US_DIR / "GREYSCALE_IMAGE.dcm"
CINE = US_DIR / "ultrasound-multiframe.dcm"


def _policy(masks: tuple[PixelMask, ...] = (), certificate: x509.Certificate | None = None) -> DeidentificationPolicy:
    return DeidentificationPolicy(PseudonymKeys(SECRET), "site-a", pixel_policy=PixelPolicy(masks=masks),
                                  recipient_certificate=certificate)


def test_ultrasound_with_burned_in_text_is_refused_without_a_mask() -> None:
    dataset = pydicom.dcmread(GREYSCALE)
    with pytest.raises(BurnedInAnnotationRisk, match="BurnedInAnnotation"):
        deidentify(dataset, _policy())


def test_secondary_capture_is_refused_even_without_the_flag() -> None:
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.Modality = "OT"
    with pytest.raises(BurnedInAnnotationRisk):
        deidentify(dataset, _policy())


def test_a_matching_mask_blacks_out_its_rectangle_and_nothing_else() -> None:
    dataset = pydicom.dcmread(GREYSCALE)
    before = dataset.pixel_array.copy()
    mask = PixelMask("US", int(dataset.Rows), int(dataset.Columns), ((0, 0, 1024, 60), (900, 100, 50, 20)),
                     manufacturer=str(dataset.Manufacturer))
    result = deidentify(dataset, _policy((mask,)))
    after = pydicom.dcmread(DicomBytesIO(encode_dataset(dataset))).pixel_array
    assert result.masked
    assert not after[:60, :].any() and not after[100:120, 900:950].any()
    untouched = np.ones(before.shape, dtype=bool)
    untouched[:60, :] = False
    untouched[100:120, 900:950] = False
    assert np.array_equal(after[untouched], before[untouched])
    assert before[:60, :].any()  # there was something to hide
    assert dataset.BurnedInAnnotation == "NO"
    assert "113101" in [c.CodeValue for c in dataset.DeidentificationMethodCodeSequence]


def test_mask_for_another_size_or_manufacturer_does_not_apply() -> None:
    dataset = pydicom.dcmread(GREYSCALE)
    wrong_size = PixelMask("US", 480, 640, ((0, 0, 10, 10),))
    wrong_maker = PixelMask("US", int(dataset.Rows), int(dataset.Columns), ((0, 0, 10, 10),),
                            manufacturer="ANOTHER VENDOR")
    with pytest.raises(BurnedInAnnotationRisk):
        deidentify(dataset, _policy((wrong_size, wrong_maker)))


def test_mask_applies_to_every_frame_of_a_colour_cine() -> None:
    dataset = pydicom.dcmread(CINE)
    frames = int(dataset.NumberOfFrames)
    mask = PixelMask("US", int(dataset.Rows), int(dataset.Columns), ((0, 0, int(dataset.Columns), 40),))
    deidentify(dataset, _policy((mask,)))
    after = pydicom.dcmread(DicomBytesIO(encode_dataset(dataset))).pixel_array
    assert after.shape[0] == frames and not after[:, :40, :, :].any() and after[:, 40:, :, :].any()


@pytest.mark.parametrize("source", [GREYSCALE, CINE], ids=["greyscale", "colour-cine"])
def test_a_masked_instance_de_identified_twice_is_byte_identical(source: Path) -> None:
    original = pydicom.dcmread(source)
    mask = PixelMask("US", int(original.Rows), int(original.Columns), ((0, 0, 64, 32),))
    first, second = pydicom.dcmread(source), pydicom.dcmread(source)
    results = [deidentify(first, _policy((mask,))), deidentify(second, _policy((mask,)))]
    assert all(r.masked for r in results)
    # The keyed UID of the original, as for an unmasked instance: not a fresh random one.
    expected_uid = PseudonymKeys(SECRET).uid(str(original.SOPInstanceUID))
    assert {r.sop_instance_uid for r in results} == {expected_uid}
    assert first.SOPInstanceUID == first.file_meta.MediaStorageSOPInstanceUID == expected_uid
    assert encode_dataset(first) == encode_dataset(second)


def _key_and_certificate(tmp_path: Path) -> tuple[Path, Path, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicom-gateway test recipient")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, certificate


def test_reversible_deidentification_round_trips(tmp_path: Path) -> None:
    key_path, cert_path, certificate = _key_and_certificate(tmp_path)
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=16))[0]
    original = pydicom.dcmread(DicomBytesIO(encode_dataset(dataset)))
    deidentify(dataset, _policy(certificate=certificate))
    encoded = encode_dataset(dataset)
    for value in PlantedIdentity().strings():  # the originals travel encrypted only
        assert value.encode() not in encoded
    path = tmp_path / "deid.dcm"
    path.write_bytes(encoded)

    out = tmp_path / "restored.dcm"
    subprocess.run([sys.executable, "-m", "gateway", "reidentify", str(path), "--key", str(key_path),
                    "--cert", str(cert_path), "--out", str(out)], check=True, capture_output=True,
                   timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert out.stat().st_mode & 0o777 == 0o600  # original identifiers: its owner's only
    restored = pydicom.dcmread(out)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "StudyInstanceUID", "SOPInstanceUID", "StudyDate", "InstitutionName"):
        assert restored.get(keyword) == original.get(keyword), keyword
    assert restored.PatientIdentityRemoved == "NO"
    assert "EncryptedAttributesSequence" not in restored
    assert restored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert restored.PixelData == original.PixelData


def test_encrypted_content_is_standard_cms_that_openssl_decrypts(tmp_path: Path) -> None:
    key_path, cert_path, certificate = _key_and_certificate(tmp_path)
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=16))[0]
    deidentify(dataset, _policy(certificate=certificate))
    stored = pydicom.dcmread(DicomBytesIO(encode_dataset(dataset)))  # as read from storage
    item = stored.EncryptedAttributesSequence[0]
    assert item.EncryptedContentTransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    (tmp_path / "content.der").write_bytes(bytes(item.EncryptedContent))
    subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-binary",
                    "-in", str(tmp_path / "content.der"), "-recip", str(cert_path),
                    "-inkey", str(key_path), "-out", str(tmp_path / "plain.bin")],
                   check=True, capture_output=True, timeout=60)
    content = read_dataset(DicomBytesIO((tmp_path / "plain.bin").read_bytes()),
                           is_implicit_VR=False, is_little_endian=True)
    originals = content.ModifiedAttributesSequence[0]
    assert str(originals.PatientName) == PlantedIdentity().patient_name
    assert originals.PatientBirthDate == PlantedIdentity().birth_date


def test_wrong_key_cannot_reidentify(tmp_path: Path) -> None:
    (tmp_path / "recipient").mkdir()
    (tmp_path / "stranger").mkdir()
    _, _, certificate = _key_and_certificate(tmp_path / "recipient")
    other_key, other_cert, _ = _key_and_certificate(tmp_path / "stranger")
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=16))[0]
    deidentify(dataset, _policy(certificate=certificate))
    path = tmp_path / "deid.dcm"
    path.write_bytes(encode_dataset(dataset))
    result = subprocess.run([sys.executable, "-m", "gateway", "reidentify", str(path), "--key",
                             str(other_key), "--cert", str(other_cert)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
