"""The spool: acknowledged instances on local disk, private, until the worker has stored
them; written by the node, STOW-RS and `import`, read by the worker; the replies the
worker leaves there for a writer waiting on its batch (STOW-RS read-your-writes); and who
holds each batch, with what was last done to hand it over (`claims`, `recovery`)."""

from spool.batches import (
    PRIVATE_DIRECTORY_MODE,
    PRIVATE_FILE_MODE,
    SPOOL_SUFFIX,
    Spool,
    SpoolError,
    SpoolWriteError,
    close_private_tree,
    fsync_directory,
    incoming_dir,
    new_association_tag,
    open_private,
    private_directory,
    receiving_dir,
    remove_older_than,
)
from spool.claims import BatchClaim, PendingRecord, ProcessMark, pid_alive, read_pending
from spool.recovery import (
    Facts,
    SweepReport,
    batch_states,
    hand_over,
    record_retry,
    record_started,
    sweep,
)
from spool.replies import (
    BatchReply,
    InstanceOutcome,
    remove_stale_replies,
    reply_requested,
    request_reply,
    take_reply,
    write_reply,
)

__all__ = [
    "PRIVATE_DIRECTORY_MODE",
    "PRIVATE_FILE_MODE",
    "SPOOL_SUFFIX",
    "BatchClaim",
    "BatchReply",
    "Facts",
    "InstanceOutcome",
    "PendingRecord",
    "ProcessMark",
    "Spool",
    "SpoolError",
    "SpoolWriteError",
    "SweepReport",
    "batch_states",
    "close_private_tree",
    "fsync_directory",
    "hand_over",
    "incoming_dir",
    "new_association_tag",
    "open_private",
    "pid_alive",
    "private_directory",
    "read_pending",
    "receiving_dir",
    "record_retry",
    "record_started",
    "remove_older_than",
    "remove_stale_replies",
    "reply_requested",
    "request_reply",
    "sweep",
    "take_reply",
    "write_reply",
]
