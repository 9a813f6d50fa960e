"""Fixtures: a real Tansu broker per test module, and helpers to run the daemon against it."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from models.calibration import CalibrationConfig
from models.detector import BatchResult, Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint
from streamer.app import build_runner
from streamer.broker import EmbeddedBroker
from streamer.config import Config, build_config
from streamer.loop import Runner
from streamer.metrics import Metrics

_names = itertools.count()


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def topics(broker: EmbeddedBroker) -> dict[str, str]:
    """Fresh topic names per test (the broker is shared by a module)."""
    n = next(_names)
    names = {"input": f"in-{n}", "scores": f"scores-{n}", "alerts": f"alerts-{n}", "dead": f"dead-{n}"}
    broker.create_topics({names["input"]: 4, names["scores"]: 2, names["alerts"]: 1, names["dead"]: 1})
    return names


def config_data(broker: EmbeddedBroker, topics: dict[str, str], state_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The settings of a test daemon, as a config file holds them (for `streamer run --config`)."""
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "consumer": {
            "group_id": f"g-{topics['input']}",
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
            "max_poll_records": 700,
            "poll_timeout_ms": 100,
        },
        "topics": {"inputs": [topics["input"]], "scores": topics["scores"], "alerts": topics["alerts"], "dead_letter": topics["dead"]},
        "state": {"dir": str(state_dir)},
        "metrics": {"enabled": False},
        "detector": {"warmup": 20},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def make_config(broker: EmbeddedBroker, topics: dict[str, str], state_dir: Path, **overrides: Any) -> Config:
    return build_config(config_data(broker, topics, state_dir, **overrides), env={})


def produce(
    broker: EmbeddedBroker,
    topic: str,
    records: list[tuple[bytes | None, bytes]],
    partition_of: Any = None,
    timestamps: list[int] | None = None,
) -> None:
    """Send (key, value) records (with these record timestamps, else the producer's) and wait for
    every ack."""
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
    for i, (key, value) in enumerate(records):
        part = partition_of(key) if partition_of else None
        p.send(topic, key=key, value=value, partition=part, timestamp_ms=None if timestamps is None else timestamps[i])
    p.flush()
    p.close()


def read_all(broker: EmbeddedBroker, topic: str, expect: int | None = None, timeout_s: float = 30.0) -> list[Any]:
    """Every record of a topic (all partitions), waiting until `expect` records have arrived."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    parts = c.partitions_for_topic(topic) or set()
    c.assign([TopicPartition(topic, p) for p in sorted(parts)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    idle_rounds = 0
    while time.monotonic() < deadline:
        batch = c.poll(timeout_ms=300)
        got = sum(len(v) for v in batch.values())
        for recs in batch.values():
            out.extend(recs)
        if expect is not None and len(out) >= expect:
            if got == 0:
                break
            continue
        if expect is None:
            idle_rounds = idle_rounds + 1 if got == 0 else 0
            if idle_rounds >= 3:
                break
    c.close()
    return out


def scores_of(records: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records]


class DaemonThread:
    """The real Runner (KafkaPythonTransport) in a thread, stopped the way SIGTERM stops it."""

    def __init__(self, config: Config) -> None:
        self.metrics = Metrics()
        self.runner: Runner = build_runner(config, self.metrics)
        self.thread = threading.Thread(target=self.runner.run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> DaemonThread:
        def target() -> None:
            try:
                self.runner.run()
            except BaseException as err:  # noqa: BLE001 - surfaced to the test
                self.error = err

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        return self

    def wait_scored(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error:
                raise self.error
            if self.metrics.scored._value.get() >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"only {self.metrics.scored._value.get()} of {n} events scored in {timeout_s}s")

    def __exit__(self, *exc: Any) -> None:
        self.runner.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "runner did not stop"
        if self.error:
            raise self.error


def event(stream: str, ts: int, values: dict[str, float]) -> bytes:
    return orjson.dumps({"stream": stream, "ts": ts, "values": values})


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny ops: one thread is faster and keeps timings stable next to other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


def default_sigint() -> None:
    """preexec_fn for a command a test interrupts with SIGINT, as a terminal's Ctrl-C would: a
    test run started as a script's background job inherits SIGINT ignored, and Python keeps it
    ignored, so without this such a command never heard it (CI runs hung on it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def autoregressive(e: np.ndarray, phi: Any, lag: int = 1) -> np.ndarray:
    """e, in place and returned, as an autoregressive process driven by its own rows: each row
    plus phi (a number, or one per column) times the row `lag` before it, in order. The tests'
    noisy sensors: consecutive readings that wander, not independent draws."""
    for i in range(lag, len(e)):
        e[i] += phi * e[i - lag]
    return e


def interleaved(
    x: np.ndarray, ts_ms: np.ndarray, calibration: CalibrationConfig | None = None, stamps: np.ndarray | None = None
) -> tuple[BatchResult, np.ndarray]:
    """Streams x [n, streams, features], every feature present, read at ts_ms [n] (delivered with
    `stamps` [n], as the daemon passes record timestamps) and fed time-major (as a live feed
    arrives) to a detector with the daemon's defaults (or `calibration`): the result and the
    mask, in that order of events."""
    n, streams, f = x.shape
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, calibration or CalibrationConfig())
    xs = np.zeros((n * streams, det.max_features))
    xs[:, :f] = x.reshape(n * streams, f)
    mask = np.zeros_like(xs, dtype=bool)
    mask[:, :f] = True
    st = None if stamps is None else np.repeat(stamps, streams)
    return det.process(np.tile(np.arange(streams), n), xs, mask, np.repeat(ts_ms, streams), st), mask


__all__ = ["DaemonThread", "config_data", "default_sigint", "event", "interleaved", "make_config", "produce", "read_all", "scores_of"]
