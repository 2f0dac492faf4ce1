"""Vendor the viewer's WebAssembly decoders from the npm registry, reproducibly.

The share viewer decodes the stored HTJ2K and JPEG-LS frames in the browser, with the
WebAssembly builds the cornerstone project publishes (OpenJPH and CharLS, MIT/BSD): no
hand-written codec. This script fetches the exact versions pinned below with `npm pack`,
checks each archive against its pinned sha512 (the registry's `dist.integrity`), and copies
the files the viewer loads, with their licence, into web_viewer_api/static/viewer/vendor/.
The copies are committed; `--check` verifies that they are still exactly the packages'.

Run: python scripts/vendor_viewer_codecs.py [--check]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "web_viewer_api" / "static" / "viewer" / "vendor"

#: folder -> (package, version, sha512 integrity, files taken from the package)
PACKAGES = {
    "openjph": ("@cornerstonejs/codec-openjph", "2.4.11",
                "sha512-NzwCYevGSj2JOuP7BztxrOd5WnJ86gOGLv3sq36jZxxHUXoDo1YhzizHiYz+T7GQqkzbfaQcwSyxsRogzGFIPQ==",
                ("dist/openjphjs.js", "dist/openjphjs.wasm", "LICENSE")),
    "charls": ("@cornerstonejs/codec-charls", "1.2.7",
               "sha512-kNfQ7J8LIrfQUbt56fPJ0SEvevLlAAbsLHjqPS4DUDWVSuAHb5Fn0cMIV/U0SYkJRJqKvzyLJYF1hl7/xQGqLQ==",
               ("dist/charlswasm_decode.js", "dist/charlswasm_decode.wasm", "LICENSE")),
}


def _fetch(package: str, version: str, integrity: str, scratch: Path) -> tarfile.TarFile:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is needed (Debian: apt-get install npm)")
    subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=scratch, check=True,
                   stdout=subprocess.DEVNULL)
    [archive] = scratch.glob("*.tgz")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(archive.read_bytes()).digest()).decode()
    if digest != integrity:
        sys.exit(f"{package}@{version}: integrity {digest} is not the pinned {integrity}")
    return tarfile.open(archive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    different = []
    for folder, (package, version, integrity, files) in PACKAGES.items():
        with tempfile.TemporaryDirectory() as scratch, \
                _fetch(package, version, integrity, Path(scratch)) as archive:
            for name in files:
                member = archive.extractfile(f"package/{name}")
                if member is None:
                    sys.exit(f"{package}@{version} has no {name}")
                body = member.read()
                target = VENDOR / folder / Path(name).name
                if args.check:
                    if not target.is_file() or target.read_bytes() != body:
                        different.append(str(target.relative_to(ROOT)))
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(body)
        print(f"{package}@{version} ({integrity[:20]}...) -> {VENDOR.relative_to(ROOT)}/{folder}")
    if different:
        sys.exit("not the packages' files: " + ", ".join(different))


if __name__ == "__main__":
    main()
