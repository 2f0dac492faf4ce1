"""kombu's `filesystem://` broker made safe for the embedded mode: no message lost.

kombu 5.6's filesystem channel loses messages three ways:

- its producer creates `<time>_<uuid>.<queue>.msg`, then writes it: a consumer polling
  the folder can take the file empty in between; `loads("")` fails after the file was
  removed (kombu issue #1551's symptom). Measured with a producer and a consumer process:
  8 of 3,000 messages lost;
- its consumer claims a file by `shutil.move` into the system temporary folder: across
  file systems (a tmpfs /tmp) that is a copy then a delete, and two consumers can copy the
  same file onto the same name, one reading it while the other truncates it (45 of 2,000
  lost with three consumers);
- it deletes a message when a consumer takes it: late acknowledgement lives only in the
  worker's memory, and a worker killed (SIGKILL, out of memory, power cut) loses what it
  held — a task running, a webhook retry waiting for its countdown.

A lost ingest message leaves the batch to the node's sweeper, minutes later; a lost
webhook message is never sent. Here a message is written under a name consumers ignore,
flushed, renamed to its final name and the folder flushed. A consumer claims a message by
renaming it into the processed folder under its owner token (of two consumers, one rename
wins) and deletes it when the message is acknowledged. Each consuming process holds a lock
on its token's file for its lifetime; when a channel opens, the claims of tokens whose lock
is free (their process died) go back to their queue, marked redelivered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterator
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from spool.batches import PRIVATE_FILE_MODE, fsync_directory, open_private

log = logging.getLogger(__name__)

#: `broker_transport` value that selects this transport for a `filesystem://` URL.
TRANSPORT = "worker.broker:Transport"

_PARTIAL = ".partial-"
#: A partial file this old was left by a producer that died while writing it.
_ABANDONED_SECONDS = 3600.0


#: (process id, processed folder) -> this process's owner token there, and the descriptor
#: of its lock file (held for the process's lifetime; the kernel drops it at death).
_OWNERS: dict[tuple[int, str], tuple[str, int]] = {}
_OWNER_FILE = "owner.{}.lock"


def _owner_token(folder: str) -> str:
    """This process's token in `folder`, made on first use: claims carry it, and its lock
    file stays exclusively locked while the process lives. A process id cannot serve:
    reused (pid 1 of every container, a reboot), it would make a dead owner look alive."""
    key = (os.getpid(), folder)  # a forked child makes its own
    if key not in _OWNERS:
        token = uuid.uuid4().hex
        # Locked before it is visible: a recovery must never see it unlocked.
        partial = os.path.join(folder, f"{_PARTIAL}{token}")
        fd = os.open(partial, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(partial, os.path.join(folder, _OWNER_FILE.format(token)))
        _OWNERS[key] = (token, fd)
    return _OWNERS[key][0]


def _write_message(folder: str, name: str, payload: Any) -> None:
    """`payload` as `folder/name`, whole or not at all: written under a name consumers
    ignore (not `<...>.<queue>.msg`), flushed, renamed, the folder flushed (the rename
    survives a power cut)."""
    partial = os.path.join(folder, f"{_PARTIAL}{uuid.uuid4()}")
    try:
        with open_private(partial) as out:  # task arguments name spool batches: 0600
            out.write(str_to_bytes(dumps(payload)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, os.path.join(folder, name))
        fsync_directory(folder)
    except OSError:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def _dead_owner(folder: str, token: str) -> Iterator[bool]:
    """True (and the owner's lock held until the block ends) when the process that made
    `token` is gone; its lock file is then removed."""
    path = os.path.join(folder, _OWNER_FILE.format(token))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True  # already recovered by another process, or never locked
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # its owner (or another recovery) holds it
            return
        yield True
        os.unlink(path)
    finally:
        os.close(fd)


class Channel(filesystem.Channel):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Messages taken and not yet acknowledged: delivery tag -> claimed file.
        self._claimed: dict[str, str] = {}
        self._queues_without_ack: set[str] = set()
        self._getting_without_ack = False
        os.makedirs(self.processed_folder, exist_ok=True)
        self._remove_abandoned_partials()
        self._recover_claims_of_dead_processes()

    def _remove_abandoned_partials(self) -> None:
        cutoff = time.time() - _ABANDONED_SECONDS
        for entry in os.scandir(self.data_folder_out):
            try:
                if entry.name.startswith(_PARTIAL) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # another process cleaned it first

    def _recover_claims_of_dead_processes(self) -> None:
        """Messages a consumer took and never acknowledged before it died (SIGKILL, out
        of memory, power cut) go back to their queue, marked redelivered: with late
        acknowledgement, a task is delivered again, as a broker server would."""
        folder = self.processed_folder
        mine = {token for (pid, where), (token, _fd) in _OWNERS.items() if pid == os.getpid()}
        claims: dict[str, list[str]] = {}
        for name in os.listdir(folder):
            owner, _, rest = name.partition(".")  # `<token>.<id>.<message>`
            if owner == "owner" and rest.endswith(".lock"):  # `owner.<token>.lock`
                owner, rest = rest.removesuffix(".lock"), ""  # an owner with no claim left
            if len(owner) == 32 and owner not in mine:
                names = claims.setdefault(owner, [])
                if rest.count(".") >= 2:
                    names.append(name)
        recovered = 0
        for token, names in claims.items():
            with _dead_owner(folder, token) as dead:
                if not dead:
                    continue
                for name in names:
                    recovered += self._requeue(os.path.join(folder, name), name.split(".", 2)[2])
        if recovered:
            log.warning(
                "broker: %d message(s) taken by a process that died unacknowledged "
                "are queued again",
                recovered,
            )

    def _requeue(self, claimed: str, original: str) -> int:
        try:
            with open(claimed, "rb") as handle:
                payload = loads(bytes_to_str(handle.read()))
        except FileNotFoundError:
            return 0  # another process recovered it first
        except ValueError:
            os.rename(claimed, os.path.join(self.processed_folder, f"unreadable.{original}"))
            return 0
        payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        _write_message(self.data_folder_in, original, payload)
        os.unlink(claimed)
        return 1

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """kombu writes the exchange's table by the umask: owner only, as the messages
        (inside a 0700 folder, so never readable by others in between)."""
        super()._queue_bind(exchange, routing_key, pattern, queue)
        table = os.path.join(self.control_folder, f"{exchange}.exchange")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(table).st_mode & 0o077:
                os.chmod(table, PRIVATE_FILE_MODE)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._queues_without_ack.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._getting_without_ack = no_ack
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._getting_without_ack = False

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self._settle(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # a requeue writes a new message first
        self._settle(delivery_tag)

    def _restore(self, message: Any) -> None:
        """Unacknowledged at a clean shutdown: written to the queue again, then settled."""
        super()._restore(message)
        self._settle(message.delivery_tag)

    def _settle(self, delivery_tag: str) -> None:
        claimed = self._claimed.pop(delivery_tag, None)
        if claimed is not None:
            self._finish(claimed)

    def _finish(self, claimed: str) -> None:
        try:
            if self.store_processed:  # kept, under a name recovery ignores
                folder, name = os.path.split(claimed)
                os.rename(claimed, os.path.join(folder, "done." + name.partition(".")[2]))
            else:
                os.unlink(claimed)
        except FileNotFoundError:
            pass

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        try:
            _write_message(self.data_folder_out, name, payload)
        except OSError as exc:
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc

    def _messages(self, queue: str) -> list[str]:
        """The message files of exactly this queue, oldest first (`<ms>_<uuid>.<queue>.msg`;
        kombu's substring test would also take queue `b.a`'s for queue `a`)."""
        wanted = f"{queue}.msg"
        return [
            name
            for name in sorted(os.listdir(self.data_folder_in))
            if name.partition(".")[2] == wanted
        ]

    def _get(self, queue: str) -> Any:
        for name in self._messages(queue):
            # Claimed by a rename into the processed folder (same file system: atomic; of
            # two consumers racing for one file, one rename succeeds), under this
            # process's owner token: kept until acknowledged, recovered if it dies.
            source = os.path.join(self.data_folder_in, name)
            try:
                token = _owner_token(self.processed_folder)
            except FileNotFoundError:
                raise ChannelError(f"broker folder {self.processed_folder!r} is missing") from None
            claimed = os.path.join(self.processed_folder, f"{token}.{uuid.uuid4().hex}.{name}")
            try:
                os.rename(source, claimed)
            except FileNotFoundError:
                if os.path.exists(source):  # the processed folder is gone: say so, loudly
                    raise ChannelError(
                        f"broker folder {self.processed_folder!r} is missing"
                    ) from None
                continue  # another consumer took it
            except OSError as exc:
                raise ChannelError(f"cannot claim message {name!r}") from exc
            try:
                with open(claimed, "rb") as handle:
                    payload = loads(bytes_to_str(handle.read()))
            except OSError as exc:
                raise ChannelError(f"cannot read claimed message {claimed!r}") from exc
            except ValueError:  # not a message (written by something else): kept aside
                os.rename(claimed, os.path.join(self.processed_folder, f"unreadable.{name}"))
                log.error("broker: message %s is not JSON; kept as unreadable.%s", name, name)
                continue
            tag = payload.get("properties", {}).get("delivery_tag")
            if queue in self._queues_without_ack or self._getting_without_ack or tag is None:
                self._finish(claimed)  # nobody will acknowledge it
            else:
                self._claimed[tag] = claimed
            return payload
        raise Empty()

    def _size(self, queue: str) -> int:
        return len(self._messages(queue))

    def _purge(self, queue: str) -> int:
        removed = 0
        for name in self._messages(queue):
            try:
                os.unlink(os.path.join(self.data_folder_in, name))
            except FileNotFoundError:
                continue
            removed += 1
        return removed


class Transport(filesystem.Transport):  # type: ignore[misc]
    Channel = Channel

    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        """At most one polling interval per call. Celery's worker drives a transport without
        asynchronous I/O (this one) with a loop that sends the acknowledgements of finished
        tasks and widens the prefetch window only between two drains, and drains with a 2 s
        timeout: a worker whose processes were all busy took its next task up to 2 s after
        they finished (10-instance batches were stored at 11 instances/s). Returning after
        one interval keeps the loop turning; an idle worker still polls every interval."""
        interval = self.polling_interval or timeout
        if timeout is None or (interval is not None and interval < timeout):
            timeout = interval
        return super().drain_events(connection, timeout=timeout)
