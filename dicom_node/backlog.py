"""Flow control: past a backlog, the node answers C-STORE no faster than the worker stores.

The spool lets the node acknowledge faster than the worker de-identifies, compresses and
indexes; a burst (a study of a few hundred images) is absorbed and searchable seconds later.
Under sustained load the difference piles up: every instance waits behind the whole backlog
before anyone can find it. So, once the spool holds more than `limit` instances, each
C-STORE answer waits (its instance is already durable) until the backlog is back under the
limit, for at most `max_hold_seconds`: the senders are slowed to the pace of the worker,
as a receiver that stores synchronously (Orthanc) slows them, and time to searchable stays
bounded.

It holds only while the worker is seen draining the spool. When the worker is stopped, or
the broker is down, nothing is removed and nothing is held: the spool then does what it is
for, taking everything the modalities send until the worker is back.

The backlog is counted from the disk (the instance files of every site's batches) every
`interval` seconds by one thread; the worker's progress is what left the spool between two
counts beyond what this node added.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from spool import SPOOL_SUFFIX

__all__ = ["SpoolBacklog"]


def _count_instances(root: Path, suffix: str) -> int:
    """Instance files in <root>/<site>/<batch>/ (dot folders, such as incoming parts and
    replies, are not the worker's backlog)."""
    count = 0
    try:
        sites = [
            entry
            for entry in os.scandir(root)
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
        ]
    except OSError:
        return 0
    for site in sites:
        try:
            batches = [
                entry for entry in os.scandir(site.path) if entry.is_dir(follow_symlinks=False)
            ]
        except OSError:
            continue
        for batch in batches:
            try:
                count += sum(
                    1
                    for entry in os.scandir(batch.path)
                    if entry.name.endswith(suffix) and not entry.name.startswith(".")
                )
            except OSError:
                continue  # processed and removed while we counted
    return count


@dataclass
class SpoolBacklog:
    """The spool's backlog, as last counted, and the hold it puts on C-STORE answers."""

    root: Path
    #: Instances the spool may hold before answers wait for the worker (0: never wait).
    limit: int
    suffix: str = SPOOL_SUFFIX
    max_hold_seconds: float = 2.0
    interval: float = 0.25
    #: Instances in the spool at the last count.
    count: int = 0
    _added: int = 0
    _drained_at: float = field(default=float("-inf"))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _changed: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    def added(self) -> None:
        """The node spooled one more instance."""
        with self._lock:
            self._added += 1

    def recount(self) -> None:
        count = _count_instances(self.root, self.suffix)
        with self._changed:
            if self.count + self._added > count:  # the worker took instances out
                self._drained_at = time.monotonic()
            self.count, self._added = count, 0
            self._changed.notify_all()

    def draining(self) -> bool:
        """The worker removed instances from the spool within the last two counts."""
        return time.monotonic() - self._drained_at <= 2 * self.interval + 0.5

    def hold(self) -> float:
        """Wait while the backlog is over the limit and the worker drains it (at most
        `max_hold_seconds`); the seconds waited."""
        if not self.limit:
            return 0.0
        started = time.monotonic()
        deadline = started + self.max_hold_seconds
        waited = False
        with self._changed:
            while self.count + self._added > self.limit and self.draining():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, self.interval))
                waited = True
        return time.monotonic() - started if waited else 0.0

    def run(self, stopping: threading.Event) -> None:
        """Count the backlog every `interval` seconds until `stopping` is set."""
        while not stopping.is_set():
            self.recount()
            stopping.wait(self.interval)
