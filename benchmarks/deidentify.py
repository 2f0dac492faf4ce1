"""De-identification speed on one core: generated 512x512 CT instances (headers only;
pixel data is carried, never decoded).

Prints instances/s for deidentify() alone, and for parse + deidentify + encode (what the
worker spends per instance before compression and storage), for three profiles.
Run: python benchmarks/deidentify.py [-n 300]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from anonymize import DeidentificationPolicy, ProfileOption, PseudonymKeys, deidentify  # noqa: E402
from gateway.sample_study import SampleStudySpec, build_sample_study  # noqa: E402
from imaging import encode_dataset  # noqa: E402


def _certificate() -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=300)
    args = parser.parse_args()
    datasets = build_sample_study(SampleStudySpec(ct_slices=args.instances, mr_slices=0))
    encoded = [encode_dataset(d) for d in datasets]
    keys = PseudonymKeys(b"benchmark-secret-0123456789abcdef")
    profiles = {
        "basic + modified dates": DeidentificationPolicy(keys, "site", options=frozenset({
            ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES})),
        "default (+ reading descriptors cleaned)": DeidentificationPolicy(keys, "site"),
        "all clean options + safe private": DeidentificationPolicy(keys, "site", options=frozenset({
            ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES, ProfileOption.CLEAN_DESCRIPTORS,
            ProfileOption.CLEAN_STRUCTURED_CONTENT, ProfileOption.CLEAN_GRAPHICS,
            ProfileOption.RETAIN_SAFE_PRIVATE})),
        "reversible (CMS for one recipient)": DeidentificationPolicy(
            keys, "site", recipient_certificate=_certificate()),
    }
    deidentify(copy.deepcopy(datasets[0]), profiles["basic + modified dates"])  # load tables
    print(f"instances: {len(datasets)} CT 512x512 16-bit, one process")
    for name, policy in profiles.items():
        copies = [copy.deepcopy(d) for d in datasets]
        started = time.perf_counter()
        for dataset in copies:
            deidentify(dataset, policy)
        alone = time.perf_counter() - started
        started = time.perf_counter()
        for blob in encoded:
            dataset = pydicom.dcmread(BytesIO(blob))
            deidentify(dataset, policy)
            encode_dataset(dataset)
        full = time.perf_counter() - started
        print(f"{name:36s} deidentify: {len(copies) / alone:7.0f} inst/s   "
              f"parse+deidentify+encode: {len(encoded) / full:7.0f} inst/s")


if __name__ == "__main__":
    main()
