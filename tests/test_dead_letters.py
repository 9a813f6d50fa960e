"""Every kind of bad input reaches the dead-letter topic with its reason; no valid event is lost."""

from __future__ import annotations

import time

import orjson
from conftest import DaemonThread, event, make_config, produce, read_all, scores_of
from kafka import KafkaProducer

from streamer.records import fit_dead_letter

BAD: dict[str, tuple[bytes | None, bytes | None]] = {
    "invalid_json": (b"x", b"this is not json {"),
    "not_an_object": (b"x", b"[1, 2, 3]"),
    "missing_stream": (None, b'{"ts": 1, "values": {"temp": 1.0}}'),
    "invalid_stream": (b"x", b'{"stream": 42, "values": {"temp": 1.0}}'),
    "invalid_timestamp": (b"x", b'{"stream": "s-1", "ts": "yesterday", "values": {"temp": 1.0}}'),
    "missing_values": (b"x", b'{"stream": "s-1", "ts": 1}'),
    "non_numeric": (b"x", b'{"stream": "s-1", "values": {"temp": "hot"}}'),
    "non_finite": (b"x", b'{"stream": "s-1", "values": {"temp": NaN}}'),
    "out_of_range": (b"x", b'{"stream": "s-1", "values": {"temp": 1e300}}'),
    "too_many_features": (b"x", event("wide", 1, {f"f{i}": 1.0 for i in range(9)})),
    "invalid_feature": (b"x", event("s-1", 1, {"t" * 257: 1.0})),
    "oversized": (b"x", event("s-1", 1, {"temp": 1.0}) + b" " * 5000),
    "tombstone": (b"s-1", None),  # dead-lettered with its null value (it was b"" and invalid_json)
}
EXTRA_NON_FINITE = [b'{"stream": "s-1", "values": {"temp": 1e999}}', b'{"stream": "s-1", "values": {"temp": -Infinity}}']
# Each of these raised out of the decoder and stopped the daemon: timestamps that do not fit
# int64 milliseconds, an integer too large for a float, a lone surrogate no output can encode.
EXTRA_RAISED = [
    b'{"stream": "s-1", "values": {"temp": 1' + b"0" * 400 + b"}}",
    b'{"stream": "s-1\\ud800", "values": {"temp": 1.0}}',
    b'{"stream": "s-1", "ts": 1e300, "values": {"temp": 1.0}}',
    # (2^64: past int64 even as nanoseconds; 2^63 is now read as nanoseconds, the year 2262)
    b'{"stream": "s-1", "ts": 18446744073709551616, "values": {"temp": 1.0}}',
]


def test_bad_input_is_dead_lettered_and_neighbours_scored(broker, topics, state_dir):
    records: list[tuple[bytes | None, bytes | None]] = []
    valid = 0
    bad = [*BAD.values(), *((b"x", v) for v in EXTRA_NON_FINITE + EXTRA_RAISED)]
    for i in range(180):
        records.append((b"s-1", event("s-1", 1_000 + i, {"temp": 20.0 + (i % 7)})))
        valid += 1
        if i % 9 == 0 and bad:
            records.append(bad.pop(0))
    assert not bad
    # Everything on one partition, so bad records sit between valid ones of the same stream.
    produce(broker, topics["input"], records, partition_of=lambda _key: 0)
    config = make_config(broker, topics, state_dir, input={"max_message_bytes": 2048})
    with DaemonThread(config) as daemon:
        daemon.wait_scored(valid)
        n_bad = len(BAD) + len(EXTRA_NON_FINITE) + len(EXTRA_RAISED)
        dead = read_all(broker, topics["dead"], expect=n_bad)
        for reason in BAD:
            assert daemon.metrics.dead_letters.labels(reason)._value.get() >= 1, reason
        assert daemon.runner.stop_event.is_set() is False  # still running after all of it

    assert len(dead) == n_bad
    by_reason: dict[str, list] = {}
    for rec in dead:
        headers = dict(rec.headers)
        assert headers["streamer.source.topic"] == topics["input"].encode()
        assert int(headers["streamer.source.partition"]) == 0
        original = records[int(headers["streamer.source.offset"])][1]
        if headers["streamer.reason"] == b"oversized":  # cut at input.max_message_bytes
            assert original is not None and original[:2048] == rec.value and int(headers["streamer.truncated"]) == len(original)
        else:
            assert original == rec.value and "streamer.truncated" not in headers, "original bytes must be kept"
        by_reason.setdefault(headers["streamer.reason"].decode(), []).append(rec)
    assert set(by_reason) == set(BAD)
    assert len(by_reason["non_finite"]) == 3
    assert len(by_reason["invalid_timestamp"]) == 3
    assert len(by_reason["out_of_range"]) == 2 and len(by_reason["invalid_json"]) == 2

    scores = scores_of(read_all(broker, topics["scores"], expect=valid))
    assert len(scores) == valid
    offsets = sorted(r["offset"] for r in scores)
    bad_offsets = {int(dict(r.headers)["streamer.source.offset"]) for r in dead}
    assert sorted(set(range(len(records))) - bad_offsets) == offsets


def test_a_stream_may_miss_readings_and_gain_features(broker, topics, state_dir):
    """A stream's first event fixed its features: one that lacked a reading there lost every later
    complete event to the dead-letter topic (schema_mismatch), and so did every later missed
    reading or null. Now a missed or null reading is left out of that event, a new feature gets
    the next channel, and only a stream that would need more channels than the model has is
    refused (too_many_features)."""
    values: list[dict[str, float | None]] = [{"a": 1.0}]  # the first event lacks b
    values += [{"a": float(i % 5), "b": float(i % 3)} for i in range(40)]
    values += [{"a": 2.0, "b": None}, {"b": 1.0}]  # a null reading, a missing one
    values += [{"a": float(i % 5), "b": 1.0, "c": float(i % 4)} for i in range(20)]  # c joins
    values.append({f"f{i}": 1.0 for i in range(6)})  # 3 + 6 features: more than the model's 8
    values.append({"a": 1.0, "b": 2.0, "c": 3.0})
    records: list[tuple[bytes | None, bytes | None]] = [
        (b"m", orjson.dumps({"stream": "m", "ts": i, "values": v})) for i, v in enumerate(values)
    ]
    produce(broker, topics["input"], records, partition_of=lambda _key: 0)
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(len(values) - 1)
        assert daemon.runner.decoder.schemas["m"] == ("a", "b", "c")
    dead = read_all(broker, topics["dead"], expect=1)
    assert [(dict(r.headers)["streamer.reason"], dict(r.headers)["streamer.source.offset"]) for r in dead] == [
        (b"too_many_features", b"63")
    ]
    scores = {r["offset"]: r for r in scores_of(read_all(broker, topics["scores"], expect=len(values) - 1))}
    assert sorted(scores) == [i for i in range(len(values)) if i != 63]
    for i, r in scores.items():
        present = {k for k, v in values[i].items() if v is not None}
        assert set(r["contributions"]) == present, i
        assert r["top_feature"] is None or r["top_feature"] in present, i


def test_an_oversized_records_dead_letter_is_cut_to_the_input_limit(broker, topics, state_dir):
    """An input record larger than the daemon's producer may send (here 150 kB against a
    100 kB max_request_size) made the dead letter's send fail for good, which stopped the
    daemon. Its value is cut at input.max_message_bytes (64 KiB), so it also fits a dead-letter
    topic with the broker's default 1 MB limit; the header says how long it was, and the record
    stays in its source topic at the offset the headers name."""
    big = event("s-1", 1, {"temp": 1.0})[:-1] + b" " * 150_000 + b"}"
    records = [(b"s-1", event("s-1", 1_000 + i, {"temp": 20.0 + i % 5})) for i in range(40)]
    records.insert(20, (b"s-1", big))
    produce(broker, topics["input"], records, partition_of=lambda _key: 0)
    config = make_config(broker, topics, state_dir, producer={"max_request_size": 100_000})
    with DaemonThread(config) as daemon:
        daemon.wait_scored(40)
        (dead,) = read_all(broker, topics["dead"], expect=1)
    headers = dict(dead.headers)
    assert headers["streamer.reason"] == b"oversized" and int(headers["streamer.source.offset"]) == 20
    assert int(headers["streamer.truncated"]) == len(big)
    assert len(dead.value) == 65_536 and big.startswith(dead.value)
    assert sorted(r["offset"] for r in scores_of(read_all(broker, topics["scores"], expect=40))) == [*range(20), *range(21, 41)]


def test_dead_letters_are_made_sendable():
    """Kafka allows null header values (Java's RecordHeader("trace", null)), which kafka-python's
    producer refuses with a TypeError that stopped the daemon: they become empty. A tombstone
    keeps its null value, unless it has no key either (Kafka needs one of them)."""
    assert fit_dead_letter(b"k", b"v", [("trace", None), ("id", b"1")], 1000, 500) == (b"k", b"v", [("trace", b""), ("id", b"1")], [])
    assert fit_dead_letter(b"k", None, [], 1000, 500)[:2] == (b"k", None)
    assert fit_dead_letter(None, None, [], 1000, 500)[:2] == (None, b"")
    assert fit_dead_letter(b"k", b"v" * 800, [], 1000, 500) == (b"k", b"v" * 500, [], [("streamer.truncated", b"800")])
    # Key and headers over half the room are dropped with the value cut: the source has them.
    key, value, headers, extra = fit_dead_letter(b"k" * 600, b"v" * 2000, [("h", b"x")], 1000, 5000)
    assert (key, headers, value) == (None, [], b"v" * 1000)
    assert extra == [("streamer.dropped", b"key of 600 bytes, 1 headers"), ("streamer.truncated", b"2000")]


def test_dead_letters_fit_whatever_their_key_and_headers():
    """A tombstone's key was never cut (a 150 kB key against 100 kB of room: refused on every
    retry, so nothing was committed again), and 40,000 empty headers counted as 40 kB were
    120 kB on the wire. A header of the input named like the daemon's came first, so a reader
    taking the first `streamer.reason` read the forged one."""

    def wire(key, value, headers):  # (what Kafka's record format spends on them, at most)
        return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v) + 10 for k, v in headers)

    key, value, headers, extra = fit_dead_letter(b"k" * 150_000, None, [], 100_000, 65_536)
    assert (key, value, headers) == (None, b"", []) and extra == [("streamer.dropped", b"key of 150000 bytes, 0 headers")]
    key, value, headers, extra = fit_dead_letter(b"s-1", b"{bad", [("h", b"")] * 40_000, 100_000, 65_536)
    assert wire(key, value, headers + extra) <= 100_000 and value == b"{bad"
    _, _, headers, _ = fit_dead_letter(b"k", b"{bad", [("streamer.reason", b"forged"), ("trace", b"1")], 1000, 500)
    assert headers == [("original.streamer.reason", b"forged"), ("trace", b"1")]


def test_records_without_a_timestamp_are_scored_at_the_time_they_arrive(broker, topics, state_dir):
    """An event without `ts` takes its Kafka record's timestamp. A record can have none (-1, as
    written in the pre-0.10 format): the event was scored at 1969-12-31T23:59:59.999 and each
    added ~1.8e9 s to the end-to-end latency histogram. It now takes the time it was polled."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for i in range(30):
        producer.send(topics["input"], key=b"s-1", value=b'{"values": {"temp": %d}}' % (20 + i % 3), timestamp_ms=-1)
    producer.flush()
    producer.close()
    before = time.time() * 1000
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(30)
        latency = daemon.metrics.e2e_latency
    after = time.time() * 1000
    scores = scores_of(read_all(broker, topics["scores"], expect=30))
    assert len(scores) == 30 and all(before <= r["ts"] <= after for r in scores)
    assert latency.counts.sum() == 0 and latency.total == 0.0  # no record had a timestamp to measure from


class _RawName(str):
    """A header name whose bytes on the wire are not UTF-8: Kafka's protocol carries any bytes
    there, and Java clients read them with replacement characters."""

    def __new__(cls, raw: bytes) -> _RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, *_args: object, **_kwargs: object) -> bytes:
        return self.raw


def test_a_record_the_client_cannot_parse_is_dead_lettered_and_passed(broker, topics, state_dir):
    """kafka-python's poll() raised on a header name that is not UTF-8, naming neither partition
    nor offset, and again at every poll: the daemon stopped, and stopped again on every restart
    at the same record. It is dead-lettered with its coordinates and passed; the client parses a
    record batch from its start, so the records after it in the same batch are dead-lettered
    too (partition 1), while those in other batches (partition 0) and partitions are scored."""
    bad = [(_RawName(b"\xff\xfetrace"), b"1")]
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=500)
    for i in range(41):  # partition 0: the bad record in a batch of its own
        p.send(topics["input"], key=b"s-1", value=event("s-1", i, {"temp": 20.0 + i % 5}), headers=bad if i == 20 else [], partition=0)
        if i in (19, 20):
            p.flush()
    for i in range(16):  # partition 1: one batch, the bad record its 11th
        p.send(topics["input"], key=b"s-2", value=event("s-2", i, {"temp": 5.0 + i % 3}), headers=bad if i == 10 else [], partition=1)
    for i in range(20):
        p.send(topics["input"], key=b"s-3", value=event("s-3", i, {"temp": 1.0 + i % 2}), partition=2 + i % 2)
    p.flush()
    p.close()
    config = make_config(broker, topics, state_dir)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(40 + 10 + 20)
        dead = read_all(broker, topics["dead"], expect=7)
        for part, end in ((0, 41), (1, 16)):
            deadline = time.monotonic() + 30
            tp = (topics["input"], part)
            while (daemon.runner.transport.committed([tp]) or {}).get(tp) != end:
                assert time.monotonic() < deadline, daemon.runner.transport.committed([tp])
                time.sleep(0.2)
        assert daemon.metrics.dead_letters.labels("unreadable")._value.get() == 7
    where = [(dict(d.headers)["streamer.source.partition"], int(dict(d.headers)["streamer.source.offset"])) for d in dead]
    assert sorted(where) == [(b"0", 20), *((b"1", o) for o in range(10, 16))]
    errors = {int(dict(d.headers)["streamer.source.offset"]): dict(d.headers)["streamer.error"] for d in dead}
    assert {dict(d.headers)["streamer.reason"] for d in dead} == {b"unreadable"} and b"UnicodeDecodeError" in errors[20]
    assert errors[11].startswith(b"in the same record batch as an unreadable record before it")
    scores = scores_of(read_all(broker, topics["scores"], expect=70))
    assert sorted(r["offset"] for r in scores if r["partition"] == 0) == [*range(20), *range(21, 41)]
    assert sorted(r["offset"] for r in scores if r["partition"] == 1) == [*range(10)]
    assert len(scores) == 70
