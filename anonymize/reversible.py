"""Reversible de-identification: original values in the Encrypted Attributes Sequence.

PS3.15 E.1.2 / PS3.3 C.12.1.1.4.1: the original values of modified or removed attributes
go into one Modified Attributes Sequence item, encoded as a data set (Explicit VR Little
Endian), wrapped in CMS EnvelopedData for the recipient's certificate (RSA), and stored in
(0400,0500) Encrypted Attributes Sequence. Only the holder of the private key can restore
the identity; `restore_identity` does it.
"""

from __future__ import annotations

from io import BytesIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian


class ReidentificationError(ValueError):
    """The encrypted attributes are absent or cannot be decrypted with this key."""


def load_certificate(pem_or_der: bytes) -> x509.Certificate:
    """A recipient certificate from PEM or DER bytes."""
    if pem_or_der.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(pem_or_der)
    return x509.load_der_x509_certificate(pem_or_der)


def _encode(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def encrypted_attributes_item(originals: Dataset, certificate: x509.Certificate) -> Dataset:
    """One Encrypted Attributes Sequence item holding `originals` for `certificate`."""
    modified = Dataset()
    modified.ModifiedAttributesSequence = Sequence([originals])
    envelope = (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(_encode(modified))
        .add_recipient(certificate)
        .encrypt(
            serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]
        )  # no MIME line-ending rewrite
    )
    item = Dataset()
    item.EncryptedContentTransferSyntaxUID = ExplicitVRLittleEndian
    item.EncryptedContent = envelope
    return item


def _der_exact(blob: bytes) -> bytes:
    """The DER object at the start of `blob`, without the even-length padding DICOM adds."""
    if len(blob) < 2 or blob[0] != 0x30:
        raise ReidentificationError("encrypted content is not a DER-encoded CMS object")
    if blob[1] < 0x80:
        return blob[: 2 + blob[1]]
    size_bytes = blob[1] & 0x7F
    length = int.from_bytes(blob[2 : 2 + size_bytes], "big")
    return blob[: 2 + size_bytes + length]


def decrypt_original_attributes(
    dataset: Dataset, certificate_pem: bytes, private_key_pem: bytes
) -> Dataset:
    """The original attributes stored in `dataset`, decrypted with the recipient's key."""
    items = dataset.get("EncryptedAttributesSequence") or []
    if not items:
        raise ReidentificationError("no Encrypted Attributes Sequence in this instance")
    certificate = load_certificate(certificate_pem)
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    last_error: Exception | None = None
    for item in items:
        try:
            envelope = _der_exact(bytes(item.EncryptedContent))
            plain = pkcs7.pkcs7_decrypt_der(envelope, certificate, key, [])  # type: ignore[arg-type]
        except ValueError as exc:
            last_error = exc
            continue
        if str(item.get("EncryptedContentTransferSyntaxUID", "")) != ExplicitVRLittleEndian:
            raise ReidentificationError("unsupported encrypted content transfer syntax")
        content = read_dataset(BytesIO(plain), is_implicit_VR=False, is_little_endian=True)
        sequence = content.get("ModifiedAttributesSequence") or []
        if len(sequence) != 1:
            raise ReidentificationError("encrypted content lacks one Modified Attributes item")
        originals: Dataset = sequence[0]
        return originals
    raise ReidentificationError(
        f"no encrypted item could be decrypted with this key ({last_error})"
    )


def restore_identity(dataset: Dataset, certificate_pem: bytes, private_key_pem: bytes) -> Dataset:
    """Put the original values back into `dataset` (in place) and return it."""
    originals = decrypt_original_attributes(dataset, certificate_pem, private_key_pem)
    for element in originals:
        dataset[element.tag] = element
    del dataset.EncryptedAttributesSequence
    dataset.PatientIdentityRemoved = "NO"
    for keyword in (
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    ):
        if keyword in dataset and keyword not in originals:
            delattr(dataset, keyword)
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None:
        file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset
