"""Log topics through the embedded broker and the real daemon: raw lines, JSON, restarts."""

from __future__ import annotations

import orjson
import pytest
from conftest import DaemonThread, make_config, produce, read_all, scores_of
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata


def _syslog(i: int, host: str, msg: str) -> bytes:
    return f"Jun 14 15:{i // 60 % 60:02d}:{i % 60:02d} {host} sshd[{1000 + i}]: {msg}".encode()


def _routine(i: int) -> str:
    return [f"Accepted password for user{i % 7} from 10.0.0.{i % 250} port {40000 + i}", f"session opened for user user{i % 7}"][i % 2]


def _log_config(broker, topics, state_dir, **extra):
    names = {**topics, "input": topics["input"] + "-unused"}
    broker.create_topics({names["input"]: 1})
    logs = {"topics": [topics["input"], topics["input"] + "-json"], "line_format": "syslog", "stream_field": "host", "warmup": 30}
    config = make_config(broker, names, state_dir, logs=logs, **extra)
    broker.create_topics({topics["input"] + "-json": 2})
    return config


def test_raw_and_json_log_topics_are_scored(broker, topics, state_dir):
    config = _log_config(broker, topics, state_dir)
    raw = [(b"web-1", _syslog(i, "web-1", _routine(i))) for i in range(200)]
    raw.append((b"web-1", _syslog(200, "web-1", "kernel panic: cannot mount root fs on unknown-block(0,0)")))
    raw.append((b"web-1", b""))  # an empty line is dead-lettered
    json_lines = []
    for i in range(100):
        record = {"ts": 1_700_000_000_000 + i * 1000, "host": "api", "level": "INFO", "message": f"GET /items/{i} 200 in {i % 9} ms"}
        json_lines.append((b"api", orjson.dumps(record)))
    produce(broker, topics["input"], raw, partition_of=lambda _k: 0)
    produce(broker, topics["input"] + "-json", json_lines)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(len(raw) - 1 + len(json_lines))
    scores = scores_of(read_all(broker, topics["scores"], expect=len(raw) - 1 + len(json_lines)))
    assert len(scores) == len(raw) - 1 + len(json_lines)
    assert {r["kind"] for r in scores} == {"log"}
    web = [r for r in scores if r["stream"] == "web-1"]
    api = [r for r in scores if r["stream"] == "api"]
    assert len(web) == 201 and len(api) == 100
    panic = web[-1]
    assert panic["line"].startswith("kernel panic") and panic["new_template"]
    assert panic["expected_template"] is not None and "<*>" in panic["expected_template"]
    assert panic["is_anomaly"], panic
    assert daemon.metrics.anomalies.labels("log")._value.get() == sum(r["is_anomaly"] for r in scores)
    assert panic["score"] == max(r["score"] for r in web[30:])
    assert {r["template"] for r in api} == {"GET <*> 200 in <*> ms"} or len({r["template_id"] for r in api}) <= 3
    dead = read_all(broker, topics["dead"], expect=1)
    assert len(dead) == 1 and dict(dead[0].headers)["streamer.reason"] == b"empty_message"


def test_template_ids_survive_a_restart(broker, topics, state_dir, caplog):
    config = _log_config(broker, topics, state_dir)
    first = [(b"db", _syslog(i, "db", _routine(i))) for i in range(120)]
    produce(broker, topics["input"], first, partition_of=lambda _k: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(len(first))
    before = {r["template"]: r["template_id"] for r in scores_of(read_all(broker, topics["scores"], expect=len(first)))}
    # Starts with the template first seen second, so a fresh miner would number them the other way.
    second = [(b"db", _syslog(i, "db", _routine(i))) for i in range(121, 181)]
    second.append((b"db", _syslog(181, "db", "replication lag 42 seconds on replica db-2")))
    produce(broker, topics["input"], second, partition_of=lambda _k: 0)
    caplog.set_level("INFO", logger="streamer.ownership")
    with DaemonThread(config) as daemon:  # a new process would do the same: state from the snapshot
        daemon.wait_scored(len(second))
        assert daemon.metrics.replayed._value.get() == 0
    records = scores_of(read_all(broker, topics["scores"], expect=len(first) + len(second)))
    after = [r for r in records if r["offset"] >= len(first)]
    assert len(after) == len(second)
    for r in after[:-1]:
        assert before[r["template"]] == r["template_id"], "a known template got a new id after the restart"
    assert after[-1]["new_template"] and after[-1]["template_id"] not in before.values()
    assert "restored 1 log streams" in caplog.text


def test_idle_log_streams_are_evicted():
    import time

    import numpy as np

    from streamer.config import build_config
    from streamer.logstreams import LogStreams
    from streamer.transport import Polled

    streams = LogStreams(build_config({"logs": {"topics": ["l"], "line_format": "syslog", "stream_field": "host"}}, env={}))
    lines = [_syslog(i, f"h{i % 3}", _routine(i)) for i in range(9)]
    polled = Polled(["l"] * 9, np.zeros(9, np.int32), np.arange(9, dtype=np.int64), np.zeros(9, np.int64), [None] * 9, lines, [[]] * 9)
    out, dead, stats = streams.process(polled, np.ones(9, dtype=bool), time.time())
    assert len(out) >= 9  # one score record per line (plus alerts)
    assert stats["scored"] == 9 and not dead and len(streams) == 3
    assert streams.evict_idle(time.time(), 3600) == 0
    assert streams.evict_idle(time.time() + 7200, 3600) == 3
    assert len(streams) == 0


def test_sensor_and_log_records_in_one_batch_are_one_observation_and_every_stream_counts(broker, topics, state_dir):
    """A batch with sensor and log records observed the step-time and wavefront histograms twice,
    and dropping sensor streams set streamer_active_streams to the sensor count alone.
    streamer_state_bytes counted the sensor bank alone, while the active streams it is divided
    by on the capacity dashboard count both kinds (a review)."""
    import time

    from conftest import event

    config = _log_config(broker, topics, state_dir)
    config = config.model_copy(update={"topics": config.topics.model_copy(update={"inputs": [topics["input"] + "-unused"]})})
    produce(broker, topics["input"] + "-unused", [(b"pump", event("pump", i, {"t": float(i % 5)})) for i in range(60)])
    produce(broker, topics["input"], [(b"web-1", _syslog(i, "web-1", _routine(i))) for i in range(60)], partition_of=lambda _k: 0)
    daemon = DaemonThread(config)  # stepped here, in this thread, so nothing races the checks
    runner, m = daemon.runner, daemon.metrics
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while m.scored._value.get() < 120:
            assert time.monotonic() < deadline, m.scored._value.get()
            runner.step()
        batches = m.batch_events.collect()[0].samples
        steps = m.step_seconds.collect()[0].samples
        count = {s.name: s.value for s in batches + steps if s.name.endswith("_count")}
        assert count["streamer_step_duration_seconds_count"] == count["streamer_batch_events_count"], count
        assert m.active_streams._value.get() == 2
        runner._refresh_state_gauges()  # (the loop does this once a second)
        logs = [part.detector.bank.nbytes() for part in runner.logs.parts.values()]
        assert logs and min(logs) > 0
        assert m.state_bytes._value.get() == runner.detector.bank.nbytes() + sum(logs)
        runner._drop(["pump"])  # as idle eviction does
        assert m.active_streams._value.get() == 1  # the log stream is still there
    finally:
        runner.shutdown()


def test_log_streams_in_their_warm_up_are_counted_as_warming_up(broker, topics, state_dir):
    """streamer_streams_warming_up counted sensor streams only: a log stream inside `logs.warmup`
    (nothing flagged yet) was reported as live."""
    import time

    config = _log_config(broker, topics, state_dir)  # (logs.warmup: 30 lines)
    daemon = DaemonThread(config)
    runner, m = daemon.runner, daemon.metrics
    runner.start()
    try:
        for n, warming in ((20, 1), (40, 0)):
            lines = [(b"web-1", _syslog(i, "web-1", _routine(i))) for i in range(n - 20, n)]
            produce(broker, topics["input"], lines, partition_of=lambda _k: 0)
            deadline = time.monotonic() + 30
            while m.scored._value.get() < n:
                assert time.monotonic() < deadline, m.scored._value.get()
                runner.step()
            runner._refresh_state_gauges()  # (the loop does this once a second)
            assert m.warming_up._value.get() == warming, n
    finally:
        runner.shutdown()


def test_a_long_line_of_control_characters_makes_a_sendable_score_record(broker, topics, state_dir):
    """A 60 KiB line (under input.max_message_bytes) of control characters made a 1.2 MB score
    record: the line three times (line, template, expected template), six JSON bytes each. Over
    Kafka's usual 1 MB (here the producer's max_request_size stands in for the broker's), its
    send was refused on every retry and nothing was committed again. Texts are clipped, saying
    how long they were; the line stays in the input topic at the record's offset."""
    config = _log_config(broker, topics, state_dir, producer={"max_request_size": 1_048_576})
    config = config.model_copy(update={"logs": config.logs.model_copy(update={"line_format": "plain"})})
    lines = [(b"web-1", b"\x01" * 61_440) for _ in range(12)] + [(b"web-1", b"after the long lines")]
    produce(broker, topics["input"], lines, partition_of=lambda _k: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(len(lines))
    records = read_all(broker, topics["scores"], expect=len(lines))
    assert max(len(r.value) for r in records) < 100_000
    last = orjson.loads(records[-2].value)
    assert last["line"].startswith("\x01" * 2048) and last["line"].endswith("(61440 characters)")
    assert orjson.loads(records[-1].value)["line"] == "after the long lines"


def test_a_log_snapshot_too_far_behind_the_committed_offset_starts_cold(broker, topics, state_dir, caplog):
    """As for sensor partitions (tests/test_restart.py): beyond state.max_replay_records, no replay."""
    config = _log_config(broker, topics, state_dir, state={"max_replay_records": 100})
    produce(broker, topics["input"], [(b"db", _syslog(i, "db", _routine(i))) for i in range(50)], partition_of=lambda _k: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(50)
    produce(broker, topics["input"], [(b"db", _syslog(i, "db", _routine(i))) for i in range(50, 300)], partition_of=lambda _k: 0)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    c.commit({TopicPartition(topics["input"], 0): OffsetAndMetadata(300, "", -1)})  # scored elsewhere
    c.close()
    produce(broker, topics["input"], [(b"db", _syslog(i, "db", _routine(i))) for i in range(300, 310)], partition_of=lambda _k: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(10)
        assert daemon.metrics.replayed._value.get() == 0
    assert "discarding log snapshot of" in caplog.text and "250 records behind the committed offset 300" in caplog.text


def test_log_topics_alerts_only(broker, topics, state_dir):
    """`topics.scores: null` on the log path: no record per line, the panic as an alert with its
    line and template, every line counted as scored and its offset committed."""
    config = _log_config(broker, topics, state_dir)
    config = config.model_copy(update={"topics": config.topics.model_copy(update={"scores": None})})
    raw = [(b"web-1", _syslog(i, "web-1", _routine(i))) for i in range(200)]
    raw.append((b"web-1", _syslog(200, "web-1", "kernel panic: cannot mount root fs on unknown-block(0,0)")))
    produce(broker, topics["input"], raw, partition_of=lambda _k: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(len(raw))
        m = daemon.metrics
        assert m.registry.get_sample_value("streamer_anomaly_score_count") == len(raw)
        assert m.registry.get_sample_value("streamer_event_time_lag_seconds_count") == len(raw)
    assert read_all(broker, topics["scores"], timeout_s=3) == []
    alerts = scores_of(read_all(broker, topics["alerts"], expect=1))
    assert alerts and alerts[-1]["line"].startswith("kernel panic") and alerts[-1]["offset"] == 200
    assert all(r["is_anomaly"] and r["kind"] == "log" for r in alerts)
    assert m.anomalies.labels("log")._value.get() == len(alerts)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    assert c.committed(TopicPartition(topics["input"], 0)) == len(raw)
    c.close()


@pytest.mark.parametrize("encoding", ["otlp_json", "otlp_proto"])
def test_otlp_batches_from_the_collector_are_scored_line_by_line(broker, topics, state_dir, encoding):
    """The OpenTelemetry Collector's Kafka exporter (`encoding: otlp_proto`, its default, or
    `otlp_json`) writes one batch of log records per message, the service named in the resource.
    Each log record is a line of its service's stream, with the message's offset and its place
    in the batch (`entry`); a batch with an unreadable log record is dead-lettered as well,
    saying which, and the rest scored."""
    from test_logs_parse import _otlp_batch, _otlp_proto_batch, _otlp_record

    batch_of = _otlp_proto_batch if encoding == "otlp_proto" else _otlp_batch

    config = _log_config(broker, topics, state_dir)
    config = config.model_copy(update={"logs": config.logs.model_copy(update={"stream_field": "service.name"})})
    t0 = 1_714_557_600_000_000_000
    batches = []
    for b in range(6):
        lines = [(f"GET /items/{b * 40 + i} 200 in {i % 9} ms", 9) for i in range(40)]
        if b == 5:
            lines[23] = ("OutOfMemoryError: Java heap space in worker pool-3", 21)
        records = [_otlp_record(t0 + (b * 40 + i) * 250_000_000, sev, text) for i, (text, sev) in enumerate(lines)]
        batches.append(batch_of([("checkout", records[:30]), ("cart", records[30:])]))
    broken = _otlp_record(t0, 9, "x", body={"kvlistValue": {"values": []}}, attributes=[])
    batches.append(batch_of([("checkout", [_otlp_record(t0 + 10**12, 9, "GET /items/1 200 in 1 ms"), broken])]))
    produce(broker, topics["input"] + "-json", [(None, b) for b in batches], partition_of=lambda _k: 0)
    expected = 6 * 40 + 1
    with DaemonThread(config) as daemon:
        daemon.wait_scored(expected)
        m = daemon.metrics
        assert m.dead_letters.labels("missing_message")._value.get() == 1
    scores = scores_of(read_all(broker, topics["scores"], expect=expected))
    assert len(scores) == expected
    assert len({(r["offset"], r["entry"]) for r in scores}) == expected
    assert [r["entry"] for r in scores if r["offset"] == 0] == list(range(40))
    assert sum(r["stream"] == "checkout" for r in scores) == 6 * 30 + 1 and sum(r["stream"] == "cart" for r in scores) == 60
    oom = next(r for r in scores if r["line"].startswith("OutOfMemoryError"))
    assert oom["offset"] == 5 and oom["entry"] == 23 and oom["stream"] == "checkout" and oom["level"] == "FATAL"
    assert oom["is_anomaly"], oom
    assert [(r["offset"], r["entry"], r["line"]) for r in scores if r["offset"] == 6] == [(6, 0, "GET /items/1 200 in 1 ms")]
    dead = read_all(broker, topics["dead"], expect=1)
    assert len(dead) == 1 and dead[0].value == batches[-1]
    headers = dict(dead[0].headers)
    assert headers["streamer.reason"] == b"missing_message" and headers["streamer.source.offset"] == b"6"
    assert b"1 of 2 log records not scored" in headers["streamer.error"]
