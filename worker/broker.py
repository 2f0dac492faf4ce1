"""kombu's `filesystem://` broker made safe for the embedded mode: no message lost.

kombu 5.6's filesystem channel loses messages two ways:

- its producer creates `<time>_<uuid>.<queue>.msg`, then writes it: a consumer polling
  the folder can take the file empty in between; `loads("")` fails after the file was
  removed (kombu issue #1551's symptom). Measured with a producer and a consumer process:
  8 of 3,000 messages lost;
- its consumer claims a file by `shutil.move` into the system temporary folder: across
  file systems (a tmpfs /tmp) that is a copy then a delete, and two consumers can copy the
  same file onto the same name, one reading it while the other truncates it (45 of 2,000
  lost with three consumers).

A lost ingest message leaves the batch to the node's sweeper, minutes later; a lost
webhook message is never sent. Here a message is written under a name consumers ignore,
flushed, renamed to its final name and the folder flushed; a consumer claims a message by
renaming it, in the same folder tree, to a name of its own (of two consumers, one rename
wins), then reads and deletes it.
"""

from __future__ import annotations

import os
import time
import uuid
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from worker.spool import fsync_directory

#: `broker_transport` value that selects this transport for a `filesystem://` URL.
TRANSPORT = "worker.broker:Transport"

_PARTIAL = ".partial-"
#: A partial file this old was left by a producer that died while writing it.
_ABANDONED_SECONDS = 3600.0


class Channel(filesystem.Channel):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remove_abandoned_partials()

    def _remove_abandoned_partials(self) -> None:
        cutoff = time.time() - _ABANDONED_SECONDS
        for entry in os.scandir(self.data_folder_out):
            try:
                if entry.name.startswith(_PARTIAL) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # another process cleaned it first

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # Not `<...>.<queue>.msg`: the consumers' name filter skips it until the rename.
        partial = os.path.join(self.data_folder_out, f"{_PARTIAL}{uuid.uuid4()}")
        try:
            with open(partial, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
            fsync_directory(self.data_folder_out)  # the rename survives a power cut
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc

    def _get(self, queue: str) -> Any:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            # `<time>_<uuid>.<queue>.msg`: exactly this queue (kombu's substring test
            # would also take queue `b.a`'s messages for queue `a`).
            if name.partition(".")[2] != wanted:
                continue
            # Claimed by a rename into the processed folder (same file system: atomic):
            # when two consumers race for one file, exactly one rename succeeds.
            claimed = os.path.join(self.processed_folder, f"{uuid.uuid4()}.{name}")
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer took it
            except OSError as exc:
                raise ChannelError(f"cannot claim message {name!r}") from exc
            try:
                with open(claimed, "rb") as handle:
                    payload = handle.read()
                if not self.store_processed:
                    os.unlink(claimed)
            except OSError as exc:
                raise ChannelError(f"cannot read claimed message {claimed!r}") from exc
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):  # type: ignore[misc]
    Channel = Channel
