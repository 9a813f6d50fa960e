"""A synthetic sensor feed into Kafka: the demo's input, and the tests' and benchmarks' load.

Events use the documented input format and are keyed by stream id, so each stream stays on
one partition, as a real keyed producer would do. A small share of deliberately broken records
can be mixed in so the dead-letter path is exercised in the demo too.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import orjson
from kafka import KafkaProducer

from models.synthetic import FEATURES, SensorFleet

# One example of each kind of bad input the daemon must survive.
GARBAGE: tuple[bytes, ...] = (
    b"this is not json",
    b'{"ts": 1, "values": {"temp": 1.0}}',
    b'{"stream": "pump-x", "values": {"temp": "hot"}}',
    b'{"stream": "pump-x", "values": {"temp": NaN}}',
    b"[1, 2, 3]",
)


def sensor_events(fleet: SensorFleet, start_step: int, n_steps: int, wall_clock: bool) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs step by step, every stream once per step."""
    chunk = fleet.generate(start_step, n_steps)
    ids = [s.encode() for s in fleet.stream_ids]
    values = chunk.values.tolist()
    for t in range(n_steps):
        ts = int(time.time() * 1000) if wall_clock else int(chunk.ts_ms[t])
        for s, key in enumerate(ids):
            event = {"stream": fleet.stream_ids[s], "ts": ts, "values": dict(zip(FEATURES, values[s][t]))}
            yield key, orjson.dumps(event)


class SensorFeed:
    """Produces a fleet's events: a fast backfill first, then `steps_per_second` live."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        fleet: SensorFleet,
        steps_per_second: float = 10.0,
        backfill_steps: int = 0,
        garbage_every: int = 0,
    ) -> None:
        self.topic = topic
        self.fleet = fleet
        self.steps_per_second = steps_per_second
        self.backfill_steps = backfill_steps
        self.garbage_every = garbage_every
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=262_144, acks=1)
        self.step = 0
        self.sent = 0
        self._garbage = itertools.cycle(GARBAGE)
        self.stop_event = threading.Event()

    def _send_steps(self, n: int, wall_clock: bool) -> None:
        for key, value in sensor_events(self.fleet, self.step, n, wall_clock):
            self.producer.send(self.topic, key=key, value=value)
            self.sent += 1
            if self.garbage_every and self.sent % self.garbage_every == 0:
                # (Without a key: the record without a stream field would otherwise be read as a
                # reading of the keyed stream, scored at ts 1, and shown as an alert from 1970.)
                self.producer.send(self.topic, key=None, value=next(self._garbage))
        self.step += n

    def run(self) -> None:
        if self.backfill_steps:
            self._send_steps(self.backfill_steps, wall_clock=False)
            self.producer.flush()
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            self._send_steps(1, wall_clock=True)
            next_at += 1.0 / self.steps_per_second
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                self.producer.flush()
                next_at = time.monotonic()
        self.producer.flush()
        self.producer.close(timeout=5)

    def stop(self) -> None:
        self.stop_event.set()


class LogFeed:
    """Synthetic service logs (JSON records): the last `backfill_s` at once, then in real time.

    15 minutes of backfill (about 5,700 lines) takes every stream past its warm-up. An hour
    (22,500 lines) kept the demo's daemon busy for most of its first minute, and the next 30
    minutes' alerts were no better for it.

    Lines carry their simulated timestamps, which line up with the wall clock from the end of
    the backfill on, so the log model sees realistic inter-arrival times.
    """

    def __init__(self, bootstrap: str, topic: str, instances: int = 9, backfill_s: float = 900.0, live_s: float = 7200.0) -> None:
        from models.logs.synth import generate

        start_ms = int(time.time() * 1000 - backfill_s * 1000)
        self.lines = generate(seed=7, instances=instances, duration_s=backfill_s + live_s, start_ms=start_ms, warmup_s=backfill_s / 2)
        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        for line in self.lines:
            delay = line.ts_ms / 1000.0 - time.time()
            if delay > 0 and self.stop_event.wait(delay):
                break
            if self.stop_event.is_set():
                break
            self.producer.send(self.topic, key=line.stream.encode(), value=line.json())
            self.sent += 1
        self.producer.flush()
        self.producer.close(timeout=5)

    def stop(self) -> None:
        self.stop_event.set()
