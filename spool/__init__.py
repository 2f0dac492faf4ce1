"""The spool: acknowledged instances on local disk, private, until the worker has stored
them; written by the node, STOW-RS and `import`, read by the worker; and the replies the
worker leaves there for a writer waiting on its batch (STOW-RS read-your-writes)."""

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
    "BatchReply",
    "InstanceOutcome",
    "Spool",
    "SpoolError",
    "SpoolWriteError",
    "close_private_tree",
    "fsync_directory",
    "incoming_dir",
    "new_association_tag",
    "open_private",
    "private_directory",
    "receiving_dir",
    "remove_older_than",
    "remove_stale_replies",
    "reply_requested",
    "request_reply",
    "take_reply",
    "write_reply",
]
