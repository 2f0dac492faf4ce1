"""The embedded broker (`filesystem://`) delivers every message to a polling consumer.

kombu's own filesystem transport creates a message file before writing it; a consumer in
another process could take the empty file and lose the message (seen as a CI failure: a
study not indexed within two minutes, its batch left to the sweeper).
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from worker import create_celery_app, filesystem_broker_options

PRODUCERS = 2
PER_PRODUCER = 1500


def _app(folder: Path):  # type: ignore[no-untyped-def]
    return create_celery_app("filesystem://", site_id="site1",
                             transport_options=filesystem_broker_options(folder, 0.001))


def _produce(folder: Path, producer: int) -> None:
    with _app(folder).connection_for_write() as connection:
        queue = connection.SimpleQueue("race")
        for number in range(PER_PRODUCER):
            queue.put({"producer": producer, "number": number})


def test_every_message_reaches_a_consumer_polling_during_the_writes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    producers = [context.Process(target=_produce, args=(tmp_path, n)) for n in range(PRODUCERS)]
    received: list[tuple[int, int]] = []
    errors: list[str] = []
    with _app(tmp_path).connection_for_read() as connection:
        queue = connection.SimpleQueue("race")
        for process in producers:
            process.start()
        deadline = time.monotonic() + 60
        while len(received) < PRODUCERS * PER_PRODUCER and time.monotonic() < deadline:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                if not any(process.is_alive() for process in producers):
                    break  # all written and the queue drained: what is missing was lost
                continue
            except Exception as exc:  # noqa: BLE001 - a torn message file; collected, asserted on
                errors.append(repr(exc))
                continue
            received.append((message.payload["producer"], message.payload["number"]))
            message.ack()
    for process in producers:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert errors == []
    assert sorted(received) == [(p, n) for p in range(PRODUCERS) for n in range(PER_PRODUCER)]
    assert not [p.name for p in (tmp_path / "queue").iterdir()]  # no partial file left behind
    # kombu's exchange table lives in the data folder, not in the working directory.
    assert (tmp_path / "control" / "race.exchange").is_file()


def test_the_embedded_app_uses_the_atomic_transport_and_others_keep_theirs(tmp_path: Path) -> None:
    embedded = _app(tmp_path).connection_for_write().get_transport_cls()
    assert f"{embedded.__module__}:{embedded.__name__}" == "worker.broker:Transport"
    redis = create_celery_app("redis://127.0.0.1:6379/15", site_id="site1")
    assert redis.connection_for_write().get_transport_cls().__module__ == "kombu.transport.redis"
