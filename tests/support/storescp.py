"""dcmtk's storescp as a C-MOVE destination, on loopback, for the Q/R tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.services import wait_for


@contextlib.contextmanager
def running_storescp(storescp: str, port: int, out: Path, extra: Sequence[str] = ()) -> Iterator[Path]:
    """storescp (AE title STORESCP) writing what it receives into `out`, until the block ends."""
    out.mkdir()
    process = subprocess.Popen([storescp, "-aet", "STORESCP", *extra, "-od", str(out), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, timeout=10, what="storescp")
        yield out
    finally:
        process.terminate()
        process.wait(timeout=10)
