"""Where a C-STORE's data set is written while it arrives: the site's spool folder.

pynetdicom writes each received data set to a temporary Part 10 file as it arrives (the
chunked receive the node turns on), by default in the system's temporary folder, where a
node killed mid-receive would leave identified data for good. Here they are written in the
spool's own `.receiving/node-<pid>` folder (0700, files 0600), one folder per node process:

- an accepted instance is renamed into its batch (its bytes written once, on one file
  system), and what a killed process left is removed by the next node that starts
  (`remove_left_by_dead_nodes`: the folders of processes that no longer exist);
- a full disk no longer breaks the association: pynetdicom would let the write error end
  its reading thread, so the file records the error and drops the rest, and the C-STORE
  handler answers 0xA700 (Out of Resources) for that instance (`write_failed`).

pynetdicom offers no setting for the folder or the file, so `install` replaces the
`NamedTemporaryFile` its DIMSE messages use (the node owns its process, as it does for
pynetdicom's other process-wide settings).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO

import pynetdicom.dimse_messages

from spool import pid_alive, private_directory, receiving_dir

log = logging.getLogger(__name__)

_PREFIX = "node-"


class ReceivedFile:
    """A data set being received: pynetdicom's temporary file, in the node's folder. A
    write that fails (disk full, I/O error) is recorded and the rest of the data set
    dropped, instead of raising in pynetdicom's reading thread."""

    def __init__(self, folder: ReceiveFolder, **options: object) -> None:
        options.pop("dir", None)
        # Not ".dcm" (pynetdicom's choice): under the spool, a .dcm file is an acknowledged
        # instance, and whoever counts them must not count one still arriving.
        options["suffix"] = ".part"
        self._raw: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - pynetdicom closes it
            dir=folder.path,
            **options,  # type: ignore[call-overload]
        )
        self.name = self._raw.name
        self._folder = folder
        self.error: OSError | None = None

    @property
    def file(self) -> ReceivedFile:
        """pynetdicom flushes `.file` after each fragment."""
        return self

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
            self._folder.failed(self.name, exc)

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._raw.write(data)
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._raw.flush()
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        try:
            self._raw.close()
        except OSError as exc:  # the last buffered bytes could not be written
            self._failed(exc)


class ReceiveFolder:
    """This node process's folder for data sets being received."""

    def __init__(self, spool_root: Path) -> None:
        self.path = private_directory(receiving_dir(spool_root) / f"{_PREFIX}{os.getpid()}")
        self._failures: dict[str, OSError] = {}
        self._lock = threading.Lock()

    def new_file(self, **options: object) -> ReceivedFile:
        return ReceivedFile(self, **options)

    def failed(self, name: str, exc: OSError) -> None:
        with self._lock:
            self._failures[name] = exc

    def write_failed(self, path: str | Path) -> OSError | None:
        """The error that cut the data set at `path` short (None: it was written whole);
        asked once, by the C-STORE handler."""
        with self._lock:
            return self._failures.pop(str(path), None)

    def install(self) -> None:
        """Make pynetdicom write received data sets here."""
        pynetdicom.dimse_messages.NamedTemporaryFile = self.new_file  # type: ignore[attr-defined,assignment]

    def remove(self) -> None:
        """At a clean stop: nothing is being received any more."""
        shutil.rmtree(self.path, ignore_errors=True)


def remove_left_by_dead_nodes(spool_root: Path) -> int:
    """Remove the receive folders of node processes that no longer exist (a node killed
    mid-receive leaves its partial data sets there); how many files were removed."""
    removed = 0
    for folder in receiving_dir(spool_root).glob(f"{_PREFIX}*"):
        pid = folder.name.removeprefix(_PREFIX)
        if not pid.isdigit() or pid_alive(int(pid)) or not folder.is_dir():
            continue
        removed += sum(1 for entry in folder.iterdir() if entry.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    if removed:
        log.info("removed %d partly received data sets left by a stopped node", removed)
    return removed


__all__ = ["ReceiveFolder", "ReceivedFile", "remove_left_by_dead_nodes"]
