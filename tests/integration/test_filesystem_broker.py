"""The embedded broker (`filesystem://`) delivers every message exactly once to consumers
polling while producers write.

kombu's own filesystem transport loses messages: its producer creates a message file
before writing it (a consumer in another process could take it empty — seen as a CI
failure: a study not indexed within two minutes, its batch left to the sweeper), and its
consumers claim files by moving them to the system temporary folder, which across file
systems is a copy two consumers can race on.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from worker import create_celery_app, filesystem_broker_options

PRODUCERS = 2
PER_PRODUCER = 1200
PAYLOAD_PADDING = "x" * 4000  # bigger files widen any window between create and write


def _claims(folder: Path) -> list[str]:
    """Messages taken and not yet acknowledged (owner lock files aside)."""
    return [p.name for p in (folder / "processed").iterdir() if not p.name.startswith("owner.")]


def _app(folder: Path):  # type: ignore[no-untyped-def]
    return create_celery_app("filesystem://", site_id="site1",
                             transport_options=filesystem_broker_options(folder, 0.001))


def _produce(folder: Path, producer: int) -> None:
    with _app(folder).connection_for_write() as connection:
        queue = connection.SimpleQueue("race")
        for number in range(PER_PRODUCER):
            queue.put({"producer": producer, "number": number, "padding": PAYLOAD_PADDING})


def _consume(folder: Path, results: Path, temporary: str) -> None:
    """Take messages until none came for two seconds after the producers' end marker."""
    os.environ["TMPDIR"] = temporary  # kombu's consumer moved claimed files there
    received, errors = [], []
    done = folder.parent / "producers-done"
    idle_since = time.monotonic()
    with _app(folder).connection_for_read() as connection:
        queue = connection.SimpleQueue("race")
        while not (done.exists() and time.monotonic() - idle_since > 2):
            try:
                message = queue.get(timeout=0.2)
            except queue.Empty:
                continue
            except Exception as exc:  # noqa: BLE001 - a torn message; collected, asserted on
                errors.append(repr(exc))
                continue
            received.append([message.payload["producer"], message.payload["number"]])
            message.ack()
            idle_since = time.monotonic()
    results.write_text(json.dumps({"received": received, "errors": errors}))


@pytest.mark.parametrize("consumers", [1, 3])
def test_every_message_reaches_exactly_one_consumer(tmp_path: Path, consumers: int) -> None:
    folder = tmp_path / "broker"
    # The system temporary folder on another file system than the broker's (tmpfs).
    temporary = "/dev/shm" if Path("/dev/shm").is_dir() else str(tmp_path)
    context = multiprocessing.get_context("spawn")
    readers = [context.Process(target=_consume, args=(folder, tmp_path / f"consumer-{n}.json", temporary))
               for n in range(consumers)]
    writers = [context.Process(target=_produce, args=(folder, n)) for n in range(PRODUCERS)]
    filesystem_broker_options(folder)  # creates the folders before anyone polls them
    for process in readers + writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    (tmp_path / "producers-done").touch()
    for process in readers:
        process.join(timeout=120)
        assert process.exitcode == 0

    received: list[tuple[int, int]] = []
    for n in range(consumers):
        result = json.loads((tmp_path / f"consumer-{n}.json").read_text())
        assert result["errors"] == []
        received += [tuple(pair) for pair in result["received"]]
    # Every message once: none lost, none delivered twice.
    assert sorted(received) == [(p, n) for p in range(PRODUCERS) for n in range(PER_PRODUCER)]
    assert not list((folder / "queue").iterdir())  # no partial or unclaimed file left
    assert _claims(folder) == []  # claimed files deleted once acknowledged
    # kombu's exchange table lives in the broker folder, not in the working directory.
    assert (folder / "control" / "race.exchange").is_file()


def _take_two_ack_one_and_die(folder: Path) -> None:
    with _app(folder).connection_for_read() as connection:
        queue = connection.SimpleQueue("late")
        acknowledged = queue.get(timeout=10)
        acknowledged.ack()
        held = queue.get(timeout=10)  # taken, not acknowledged: the task was running
        (folder / "taken.json").write_text(json.dumps(
            {"acknowledged": acknowledged.payload["number"], "held": held.payload["number"]}))
        os._exit(0)  # killed: no clean shutdown puts it back


def test_a_message_held_by_a_consumer_that_dies_is_delivered_again(tmp_path: Path) -> None:
    with _app(tmp_path).connection_for_write() as connection:
        queue = connection.SimpleQueue("late")
        for number in (1, 2, 3):
            queue.put({"number": number})
    consumer = multiprocessing.get_context("spawn").Process(
        target=_take_two_ack_one_and_die, args=(tmp_path,))
    consumer.start()
    consumer.join(timeout=60)
    assert consumer.exitcode == 0
    assert len(_claims(tmp_path)) == 1  # the claim of the dead one
    with _app(tmp_path).connection_for_read() as connection:  # a new channel recovers it
        queue = connection.SimpleQueue("late")
        again = [queue.get(timeout=10) for _ in range(2)]
        for message in again:
            message.ack()
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.2)
    # The acknowledged one is gone for good, the held one came back once (marked
    # redelivered), the third as usual.
    taken = json.loads((tmp_path / "taken.json").read_text())
    untouched = ({1, 2, 3} - {taken["acknowledged"], taken["held"]}).pop()
    assert {m.payload["number"]: m.delivery_info.get("redelivered", False) for m in again} == {
        taken["held"]: True, untouched: False}
    assert _claims(tmp_path) == []
    # The dead consumer's lock file went with its claims; only this process's is left.
    assert len(list((tmp_path / "processed").glob("owner.*.lock"))) == 1


def test_messages_taken_without_acknowledgement_are_settled_at_once(tmp_path: Path) -> None:
    with _app(tmp_path).connection_for_write() as connection:
        connection.SimpleQueue("fire").put({"n": 1})
    with _app(tmp_path).connection_for_read() as connection:
        channel = connection.default_channel
        channel.queue_declare("fire")
        message = channel.basic_get("fire", no_ack=True)
        assert message is not None and message.payload == {"n": 1}
        assert _claims(tmp_path) == []


def test_a_missing_processed_folder_is_an_error_not_an_empty_queue(tmp_path: Path) -> None:
    from kombu.exceptions import ChannelError

    with _app(tmp_path).connection_for_write() as connection:
        connection.SimpleQueue("q").put({"n": 1})
    with _app(tmp_path).connection_for_read() as connection:
        queue = connection.SimpleQueue("q")
        (tmp_path / "processed").rmdir()  # an operator cleaning up
        with pytest.raises(ChannelError, match="missing"):
            queue.get(timeout=1)


def test_abandoned_partial_files_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    options = filesystem_broker_options(tmp_path)
    queue_dir = Path(options["data_folder_in"])
    old, fresh = queue_dir / ".partial-old", queue_dir / ".partial-fresh"
    old.write_bytes(b'{"half')
    fresh.write_bytes(b'{"being written')
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    with _app(tmp_path).connection_for_read() as connection:
        queue = connection.SimpleQueue("anything")
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.1)
    assert not old.exists() and fresh.exists()


def test_the_embedded_app_uses_the_atomic_transport_and_others_keep_theirs(tmp_path: Path) -> None:
    embedded = _app(tmp_path).connection_for_write().get_transport_cls()
    assert f"{embedded.__module__}:{embedded.__name__}" == "worker.broker:Transport"
    redis = create_celery_app("redis://127.0.0.1:6379/15", site_id="site1")
    assert redis.connection_for_write().get_transport_cls().__module__ == "kombu.transport.redis"


def test_a_drain_returns_after_one_polling_interval(tmp_path: Path) -> None:
    """Celery's worker sends the acknowledgements of finished tasks, and takes more, only
    between two drains, and asks each drain to wait up to 2 s: the embedded transport
    returns after one polling interval instead, so a worker whose processes were all busy
    takes its next task at once (it waited up to 2 s per task: 11 instances/s)."""
    import socket

    app = create_celery_app("filesystem://", site_id="site1",
                            transport_options=filesystem_broker_options(tmp_path / "broker", 0.05))
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("drain")  # consuming a queue with nothing in it
        queue.consumer.consume()
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=2.0)
        assert time.monotonic() - started < 0.5
        queue.put({"n": 1})  # and a message still arrives through a drain
        received = []
        queue.consumer.register_callback(lambda body, message: (received.append(body), message.ack()))
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout):
                connection.drain_events(timeout=2.0)
        assert received == [{"n": 1}]
        queue.close()
