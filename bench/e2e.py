"""End to end through the embedded broker: the real Runner, and bare kafka-python as the baseline.

Why a baseline in the same run: an events/second figure for the daemon alone says as much
about the machine (and whatever else runs on it) as about the daemon. The daemon reads every
input record and writes one score record per event, so its ceiling is set by kafka-python's
consumer and, mostly, its producer on the same broker. Measuring those bare clients on the
same broker, with the same records and in the same process, turns the daemon's rate into a
ratio that carries over between machines.

Timing: the clock starts when `runner.ready` is set, i.e. right after the first poll that
completed the group join (joining takes seconds and is not throughput), and stops when the
broker has acknowledged one score record per input event (the `streamer_output_records_total`
counter for the scores topic reaches N), so the last batch's produce is included.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import orjson
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.core import ACTIVE_FEATURES, LEVELS, NOISE
from bench.machine import peak_rss_bytes
from models.detector import BatchResult
from models.synthetic import FEATURES
from streamer.app import build_runner
from streamer.broker import EmbeddedBroker
from streamer.config import Config, ProducerConfig, build_config
from streamer.metrics import Metrics
from streamer.transport import COMMITTED_TIMEOUT_MS, TP, KafkaPythonTransport, OutRecord, Polled

INPUT_PARTITIONS = 4
SCORE_RECORD_BYTES = 250  # what the baseline producer sends: about one score record


# -- the daemon's Kafka calls, timed --------------------------------------------------------
class Intervals:
    """(kind, start, end) of every timed call, so a breakdown can be clipped to the measured window."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def record(self, kind: str, start: float, end: float) -> None:
        with self._lock:
            self.spans.append((kind, start, end))

    def totals(self, t0: float, t1: float) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._lock:
            spans = list(self.spans)
        for kind, a, b in spans:
            overlap = min(b, t1) - max(a, t0)
            if overlap > 0:
                out[kind] = out.get(kind, 0.0) + overlap
        return out


class TimedTransport:
    """The daemon's real KafkaPythonTransport, with the time of each poll, send and commit recorded.

    It goes through the Transport seam build_runner already offers, so the Runner under test is
    unchanged.
    """

    def __init__(self, inner: KafkaPythonTransport, intervals: Intervals, watch_topic: str | None, target: int) -> None:
        self.inner = inner
        self.intervals = intervals
        # Completion is signalled from here rather than by polling the metrics from another
        # thread: a polling thread competes for the GIL, which the daemon's torch calls release
        # and re-take around every op, and that measurably slows the one-stream case.
        self.watch_topic = watch_topic  # None (alerts only): count committed events instead
        self.target = target
        self.committed_at: dict[TP, int] = {}
        self.acked = 0
        self.last_ack_at: float | None = None
        self.done_at: float | None = None
        self.done = threading.Event()

    def _timed(self, kind: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.intervals.record(kind, t, time.perf_counter())

    def subscribe(self, topics: Sequence[str], on_assign: Callable[[list[TP]], None], on_revoke: Callable[[list[TP]], None]) -> None:
        self.inner.subscribe(topics, on_assign, on_revoke)

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        return self._timed("poll", self.inner.poll, timeout_ms, max_records)

    def send_batch(self, records: Sequence[OutRecord]) -> None:
        """Send and wait for acks (raises SendError as the real one does), then count the watched topic."""
        self._timed("send", self.inner.send_batch, records)
        if self.watch_topic is not None:
            self._count(self.acked + sum(1 for r in records if r.topic == self.watch_topic))

    def _count(self, acked: int) -> None:
        self.acked = acked
        self.last_ack_at = time.perf_counter()
        if self.acked >= self.target and self.done_at is None:
            self.done_at = time.perf_counter()
            self.done.set()

    def commit(self, offsets: dict[TP, int], timeout_ms: int | None = None) -> bool:
        ok = self._timed("commit", self.inner.commit, offsets, timeout_ms)
        if ok and self.watch_topic is None:
            # (Committed only once the batch's outputs were acknowledged; the input starts at 0.)
            self.committed_at.update(offsets)
            self._count(sum(self.committed_at.values()))
        return bool(ok)

    def committed(self, tps: list[TP], timeout_ms: int = COMMITTED_TIMEOUT_MS) -> dict[TP, int | None]:
        return self.inner.committed(tps, timeout_ms)

    def seek(self, tp: TP, offset: int) -> None:
        self.inner.seek(tp, offset)

    def highwater(self, tp: TP) -> int | None:
        return self.inner.highwater(tp)

    def position(self, tp: TP) -> int | None:
        return self.inner.position(tp)

    def topic_id(self, topic: str) -> str | None:
        fn = getattr(self.inner, "topic_id", None)
        return fn(topic) if fn is not None else None

    def __getattr__(self, name: str) -> Any:
        """Anything the Transport protocol gains later passes straight through, untimed."""
        return getattr(self.inner, name)

    def assignment(self) -> list[TP]:
        return self.inner.assignment()

    def close(self) -> None:
        self.inner.close()


# -- input ---------------------------------------------------------------------------------
def stream_id(i: int) -> str:
    return f"s-{i:06d}"


def input_events(streams: int, n: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """N events in the documented input format, keyed by stream id, every stream once per step
    (as a fleet of sensors reporting on the same clock would produce them)."""
    rng = np.random.default_rng(seed)
    levels = LEVELS * (1.0 + 0.2 * rng.standard_normal((streams, ACTIVE_FEATURES)))
    ids = [stream_id(i) for i in range(streams)]
    keys = [s.encode() for s in ids]
    slots = np.arange(n) % streams
    values = np.round(levels[slots] + NOISE * rng.standard_normal((n, ACTIVE_FEATURES)), 4).tolist()
    names = FEATURES[:ACTIVE_FEATURES]
    ts0 = 1_700_000_000_000
    out = []
    for i, s in enumerate(slots.tolist()):
        step = i // streams
        event = {"stream": ids[s], "ts": ts0 + step * 1000, "values": dict(zip(names, values[i]))}
        out.append((keys[s], orjson.dumps(event)))
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], flush_every: int | None = None, **opts: Any) -> float:
    """Send every record and wait for all acks; returns the seconds from first send to last ack.

    flush_every=None flushes once at the end (the producer's ceiling); a number flushes after
    every that many records, the way the daemon waits for each batch's acks before committing.
    """
    p = KafkaProducer(bootstrap_servers=bootstrap, **opts)
    try:
        p.partitions_for(topic)  # metadata and connection before the clock starts
        t0 = time.perf_counter()
        futures = []
        for i, (key, value) in enumerate(records, 1):
            futures.append(p.send(topic, key=key, value=value))
            if flush_every and i % flush_every == 0:
                p.flush()
                for f in futures:
                    f.get()
                futures = []
        p.flush()
        for f in futures:
            f.get()
        return time.perf_counter() - t0
    finally:
        p.close(timeout=5)


def consume(bootstrap: str, topic: str, n: int, config: Config, timeout_s: float) -> float:
    """Read n records from the start of every partition with a bare consumer; returns seconds."""
    c = config.consumer
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=c.max_poll_records,
        fetch_max_bytes=c.fetch_max_bytes,
        max_partition_fetch_bytes=c.max_partition_fetch_bytes,
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        begin = consumer.beginning_offsets(tps)  # connects before the clock starts
        for tp, off in begin.items():
            consumer.seek(tp, off)
        got = 0
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        while got < n and time.perf_counter() < deadline:
            batch = consumer.poll(timeout_ms=c.poll_timeout_ms, max_records=c.max_poll_records)
            got += sum(len(v) for v in batch.values())
        if got < n:
            raise RuntimeError(f"bare consumer read only {got} of {n} records in {timeout_s}s")
        return time.perf_counter() - t0
    finally:
        consumer.close()


def score_like_records(streams: int, n: int) -> list[tuple[bytes, bytes]]:
    """N records of SCORE_RECORD_BYTES each, keyed like the daemon's score records."""
    out = []
    for i in range(n):
        key = stream_id(i % streams).encode()
        head = b'{"stream":"' + key + b'","offset":' + str(i).encode() + b',"pad":"'
        value = head + b"x" * (SCORE_RECORD_BYTES - len(head) - 2) + b'"}'
        out.append((key, value))
    return out


# -- the case ------------------------------------------------------------------------------
@dataclass
class E2EResult:
    streams: int
    events: int  # pre-produced
    scored: int  # acknowledged score records inside the timed window (< events if the budget ran out)
    baseline_events: int  # records each bare-client baseline moved
    device: str
    torch_threads: int  # intra-op threads the daemon thread ran with
    max_poll_records: int
    daemon_seconds: float
    daemon_events_per_s: float
    join_seconds: float
    bare_consume_per_s: float
    bare_produce_per_s: float  # flush once at the end: the producer's ceiling
    bare_produce_batched_per_s: float  # flush (wait for acks) every max_poll_records, like the daemon
    serial_ceiling_per_s: float  # 1 / (1/consume + 1/produce_batched): a bare consume-then-produce loop
    ratio_vs_produce: float
    ratio_vs_ceiling: float
    input_produce_per_s: float
    input_record_bytes: float
    score_record_bytes: float | None
    batches: int
    events_per_batch: float
    wavefronts_per_batch: float
    breakdown_s: dict[str, float] = field(default_factory=dict)
    bank_bytes: int = 0
    bank_capacity: int = 0
    active_streams: int = 0
    peak_rss_bytes: int = 0
    note: str = ""
    outputs: str = "scores"  # "alerts only": the daemon ran with topics.scores null


def daemon_config(
    broker: EmbeddedBroker, topics: dict[str, str], state_dir: Path, device: str, max_poll_records: int, alerts_only: bool = False
) -> Config:
    """Like tests/conftest.py's make_config (short session timeouts, metrics off), but with the
    daemon's default poll size unless told otherwise and its default calibration warm-up.
    alerts_only: `topics.scores: null`."""
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": broker.bootstrap, "client_id": "bench"},
        "consumer": {
            "group_id": f"bench-{topics['input']}-{uuid.uuid4().hex[:8]}",
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
            "max_poll_records": max_poll_records,
            "poll_timeout_ms": 100,
        },
        "topics": {
            "inputs": [topics["input"]],
            "scores": None if alerts_only else topics["scores"],
            "alerts": topics["alerts"],
            "dead_letter": topics["dead"],
        },
        "state": {"dir": str(state_dir)},
        "metrics": {"enabled": False},
        "detector": {"device": device},
    }
    return build_config(data, env={})


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return float(value) if value is not None else 0.0


def _score_record_bytes(bootstrap: str, topic: str, sample: int = 200) -> float | None:
    """Mean size of a few of the daemon's score records, to compare with the baseline's 250 bytes."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        sizes: list[int] = []
        deadline = time.monotonic() + 5.0
        while len(sizes) < sample and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200, max_records=sample).values():
                sizes.extend(len(r.value) for r in recs)
        return float(np.mean(sizes)) if sizes else None
    finally:
        consumer.close()


@dataclass
class DaemonRun:
    """What one daemon run measured, read before the runner was stopped."""

    seconds: float
    join_seconds: float
    acked: int
    metrics: Metrics
    intervals: Intervals
    window: tuple[float, float]
    bank_bytes: int
    bank_capacity: int
    active_streams: int
    note: str


def run_daemon(config: Config, n: int, scores_topic: str | None, budget_s: float, threads: int | None) -> DaemonRun:
    """Run the real Runner in a thread until N score records are acknowledged (scores_topic None:
    until N events are committed, which follows their outputs' acks), then stop it.

    If budget_s runs out first, the run ends there and the rate is taken over what was
    acknowledged up to the last acknowledged batch (the note says so): a rate needs no more.
    The runner's shutdown (a snapshot of every partition) happens after the clock stops.
    threads: torch intra-op threads set inside the daemon thread (None: torch's default, as
    `streamer run` has it).
    """
    metrics = Metrics()
    intervals = Intervals()
    transport = TimedTransport(KafkaPythonTransport(config), intervals, scores_topic, n)
    runner = build_runner(config, metrics, transport)
    process = runner.detector.process

    def timed_process(
        slots: np.ndarray, x: np.ndarray, mask: np.ndarray, ts_ms: np.ndarray | None = None, stamps: np.ndarray | None = None
    ) -> BatchResult:
        t = time.perf_counter()
        try:
            return process(slots, x, mask, ts_ms, stamps)
        finally:
            intervals.record("step", t, time.perf_counter())

    runner.detector.process = timed_process  # type: ignore[method-assign]  # timing only, same behaviour
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            runner.run()
        except BaseException as err:  # noqa: BLE001 - reported by the benchmark
            errors.append(err)
        finally:
            transport.done.set()  # wake the waiter if the runner died

    started = time.perf_counter()
    thread = threading.Thread(target=target, name="bench-daemon", daemon=True)
    thread.start()
    note = ""
    try:
        if not runner.ready.wait(timeout=60):
            raise RuntimeError("the daemon did not join its group within 60s")
        t0 = time.perf_counter()
        transport.done.wait(timeout=budget_s)
        if errors:
            raise errors[0]
        # Counted now: the batch in flight when the budget ran out is still acknowledged while
        # the runner stops, after t1, and counting it would overstate the rate (by ~19% for
        # one stream: 5,000 of 26,000 events).
        acked = transport.acked
        t1 = transport.done_at or transport.last_ack_at or time.perf_counter()
        if transport.done_at is None:
            note = f"stopped at the {budget_s:g}s budget: {acked:,} of {n:,} scored"
        bank = runner.detector.bank
        bank_bytes, bank_capacity, active = bank.nbytes(), bank.capacity, len(runner.slots)
    finally:
        runner.stop()
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return DaemonRun(t1 - t0, t0 - started, min(acked, n), metrics, intervals, (t0, t1), bank_bytes, bank_capacity, active, note)


def run_case(
    broker: EmbeddedBroker,
    streams: int,
    n: int,
    device: str,
    max_poll_records: int,
    timeout_s: float,
    threads: int | None = None,
    baseline_events: int | None = None,
    log: Callable[[str], None] = print,
    budget_s: float | None = None,
    alerts_only_too: bool = False,
) -> list[E2EResult]:
    """Pre-produce N events, run the daemon over them, then the bare-client baselines.

    baseline_events caps the records the baselines move (they measure a rate, which a few
    tens of thousands of records already pin down; --quick uses this to stay short).
    alerts_only_too: a second daemon (its own group) reads the same events with
    `topics.scores: null`, against the same baselines.
    """
    tag = f"{streams}-{uuid.uuid4().hex[:6]}"
    topics = {"input": f"bench-in-{tag}", "scores": f"bench-scores-{tag}", "alerts": f"bench-alerts-{tag}", "dead": f"bench-dead-{tag}"}
    base_out, base_out_batched = f"bench-base-{tag}", f"bench-base-batched-{tag}"
    broker.create_topics(
        {topics["input"]: INPUT_PARTITIONS, topics["scores"]: 2, topics["alerts"]: 1, topics["dead"]: 1, base_out: 2, base_out_batched: 2}
    )
    events = input_events(streams, n)
    input_bytes = float(np.mean([len(v) for _, v in events]))
    log(f"e2e {streams:,} streams: producing {n:,} input events")
    input_secs = produce(broker.bootstrap, topics["input"], events, acks="all", linger_ms=20, batch_size=262_144)
    del events

    runs: list[tuple[bool, DaemonRun]] = []
    for alerts_only in (False, True) if alerts_only_too else (False,):
        with TemporaryDirectory(prefix="streamer-bench-") as state_dir:
            config = daemon_config(broker, topics, Path(state_dir), device, max_poll_records, alerts_only)
            log(f"e2e {streams:,} streams: daemon{' (alerts only)' if alerts_only else ''}")
            runs.append((alerts_only, run_daemon(config, n, None if alerts_only else topics["scores"], budget_s or timeout_s, threads)))

    m = n if baseline_events is None else min(n, baseline_events)
    log(f"e2e {streams:,} streams: bare consumer and producer baselines ({m:,} records each)")
    consume_secs = consume(broker.bootstrap, topics["input"], m, config, timeout_s)
    p = ProducerConfig()
    opts: dict[str, Any] = {"acks": p.acks, "linger_ms": p.linger_ms, "batch_size": p.batch_size, "max_request_size": p.max_request_size}
    out_records = score_like_records(streams, m)
    produce_secs = produce(broker.bootstrap, base_out, out_records, **opts)
    produce_batched_secs = produce(broker.bootstrap, base_out_batched, out_records, flush_every=max_poll_records, **opts)
    del out_records

    consume_rate, produce_rate, batched_rate = m / consume_secs, m / produce_secs, m / produce_batched_secs
    ceiling = 1.0 / (1.0 / consume_rate + 1.0 / batched_rate)
    record_bytes = _score_record_bytes(broker.bootstrap, topics["scores"])
    results = []
    for alerts_only, run in runs:
        totals = run.intervals.totals(*run.window)
        totals["other"] = max(0.0, run.seconds - sum(totals.values()))  # decode, score records, metrics, housekeeping
        metrics = run.metrics
        batches = _sample(metrics, "streamer_batch_events_count")
        batch_events = _sample(metrics, "streamer_batch_events_sum")
        waves = _sample(metrics, "streamer_batch_wavefronts_sum")
        secs = run.seconds
        daemon_rate = run.acked / secs if secs > 0 else 0.0
        results.append(
            E2EResult(
                streams=streams,
                events=n,
                scored=run.acked,
                baseline_events=m,
                device=device,
                torch_threads=threads if threads is not None else torch.get_num_threads(),
                max_poll_records=max_poll_records,
                daemon_seconds=secs,
                daemon_events_per_s=daemon_rate,
                join_seconds=run.join_seconds,
                bare_consume_per_s=consume_rate,
                bare_produce_per_s=produce_rate,
                bare_produce_batched_per_s=batched_rate,
                serial_ceiling_per_s=ceiling,
                ratio_vs_produce=daemon_rate / produce_rate,
                ratio_vs_ceiling=daemon_rate / ceiling,
                input_produce_per_s=n / input_secs,
                input_record_bytes=input_bytes,
                score_record_bytes=None if alerts_only else record_bytes,
                batches=int(batches),
                events_per_batch=batch_events / batches if batches else 0.0,
                wavefronts_per_batch=waves / batches if batches else 0.0,
                breakdown_s=totals,
                bank_bytes=run.bank_bytes,
                bank_capacity=run.bank_capacity,
                active_streams=run.active_streams,
                peak_rss_bytes=peak_rss_bytes(),
                note=run.note,
                outputs="alerts only" if alerts_only else "scores",
            )
        )
    return results


def run_e2e(
    cases: list[tuple[int, int, float | None]],
    device: str,
    max_poll_records: int,
    timeout_s: float,
    threads: int | None = None,
    baseline_events: int | None = None,
    log: Callable[[str], None] = print,
    alerts_only_too: bool = False,
) -> list[E2EResult]:
    """All (streams, events, daemon time budget or None) cases against one embedded broker
    (fresh topics per case); without a budget a case may run for timeout_s. alerts_only_too:
    each case also runs the daemon with `topics.scores: null` (a row of its own)."""
    results = []
    with EmbeddedBroker() as broker:
        for streams, n, budget in cases:
            results += run_case(
                broker, streams, n, device, max_poll_records, timeout_s, threads, baseline_events, log, budget, alerts_only_too
            )
    return results
