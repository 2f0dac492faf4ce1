"""What the worker did with each instance of a batch, for a writer waiting on it (STOW-RS).

STOW-RS answers with the truth: the UIDs the instances are stored under, what was coerced,
what will not be stored and why — and only once the instances are searchable. The API
spools a request's instances like the node does, marks each batch as awaited
(`request_reply`), and waits for the worker's reply file. Replies live in the spool (they
name the spooled files, i.e. the UIDs as sent: identified data, 0600 in a 0700 folder),
beside the batches, under `<spool>/.replies/<site>/<batch>.json`, and are removed by the
writer that read them (or, left by a writer that gave up, after a day).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spool.batches import fsync_directory, open_private, private_directory, remove_older_than

#: In a batch folder: a writer waits for this batch's reply.
REPLY_MARKER = ".reply"
_REPLIES = ".replies"


@dataclass(frozen=True)
class InstanceOutcome:
    """One spooled instance, as the worker left it. `stored`: searchable under the UIDs
    given (de-identified, or the domain's for a write-back); otherwise `failure_reason`
    (a PS3.18 Table 10.5.3-2 / PS3.4 status) and `reason`, a sentence without any value."""

    stored: bool
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    #: Attributes were changed from what was sent (de-identification, a write-back cleaned).
    coerced: bool = False
    failure_reason: int = 0
    reason: str = ""


@dataclass
class BatchReply:
    """The outcome of every instance of one batch, by spool file name."""

    instances: dict[str, InstanceOutcome] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps({name: asdict(o) for name, o in self.instances.items()}).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> BatchReply:
        document = json.loads(body)
        return cls({name: InstanceOutcome(**values) for name, values in document.items()})


def reply_path(spool_root: Path, site_id: str, batch_id: str) -> Path:
    return spool_root / _REPLIES / site_id / f"{batch_id}.json"


def request_reply(batch_dir: Path) -> None:
    """Mark a spooled batch as awaited: its worker writes a reply (before it is enqueued)."""
    with open_private(batch_dir / REPLY_MARKER, exclusive=False):
        pass


def reply_requested(batch_dir: Path) -> bool:
    return (batch_dir / REPLY_MARKER).exists()


def write_reply(spool_root: Path, site_id: str, batch_id: str, reply: BatchReply) -> None:
    """Atomically publish a batch's reply (a reader never sees half of it)."""
    target = reply_path(spool_root, site_id, batch_id)
    private_directory(target.parent)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    with open_private(temp) as handle:
        handle.write(reply.to_bytes())
    os.replace(temp, target)
    fsync_directory(target.parent)


def take_reply(spool_root: Path, site_id: str, batch_id: str) -> BatchReply | None:
    """The batch's reply if the worker wrote it (removed as it is read), else None."""
    path = reply_path(spool_root, site_id, batch_id)
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return BatchReply.from_bytes(body)


def remove_stale_replies(spool_root: Path, older_than_seconds: float = 86400.0) -> int:
    """Replies nobody read (the writer gave up or died): removed after a while."""
    return remove_older_than((spool_root / _REPLIES).glob("*/*.json"), older_than_seconds)


__all__ = [
    "REPLY_MARKER",
    "BatchReply",
    "InstanceOutcome",
    "remove_stale_replies",
    "reply_path",
    "reply_requested",
    "request_reply",
    "take_reply",
    "write_reply",
]
