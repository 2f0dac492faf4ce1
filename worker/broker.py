"""kombu's `filesystem://` broker with atomic message files (the embedded mode's broker).

kombu 5.6's filesystem channel creates `<time>_<uuid>.<queue>.msg`, then writes it. A
consumer polling the same folder can move the file away in between and read it empty:
`loads("")` fails after the file was removed, and the message is gone (kombu issue
#1551's symptom). Measured here with a producer and a consumer process: 8 of 3,000
messages lost. A lost ingest message leaves the batch to the node's sweeper, minutes
later; a lost webhook message is never sent.

Here each message is written under a name the consumer ignores, flushed to disk, then
renamed to its final name: a consumer sees a whole message or none.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: `broker_transport` value that selects this transport for a `filesystem://` URL.
TRANSPORT = "worker.broker:Transport"


class Channel(filesystem.Channel):  # type: ignore[misc]
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # Not `<...>.<queue>.msg`: the consumer's name filter skips it until the rename.
        partial = os.path.join(self.data_folder_out, f".partial-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):  # type: ignore[misc]
    Channel = Channel
