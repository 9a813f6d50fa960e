"""Every kind of bad input reaches the dead-letter topic with its reason; no valid event is lost."""

from __future__ import annotations

from conftest import DaemonThread, event, make_config, produce, read_all, scores_of

BAD: dict[str, tuple[bytes | None, bytes]] = {
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
    "schema_mismatch": (b"s-1", event("s-1", 1, {"pressure": 1.0})),
    "oversized": (b"x", event("s-1", 1, {"temp": 1.0}) + b" " * 5000),
}
EXTRA_NON_FINITE = [b'{"stream": "s-1", "values": {"temp": 1e999}}', b'{"stream": "s-1", "values": {"temp": -Infinity}}']
# Each of these raised out of the decoder and stopped the daemon: timestamps that do not fit
# int64 milliseconds, an integer too large for a float, a lone surrogate no output can encode.
EXTRA_RAISED = [
    b'{"stream": "s-1", "values": {"temp": 1' + b"0" * 400 + b"}}",
    b'{"stream": "s-1\\ud800", "values": {"temp": 1.0}}',
    b'{"stream": "s-1", "ts": 1e300, "values": {"temp": 1.0}}',
    b'{"stream": "s-1", "ts": 9223372036854775808, "values": {"temp": 1.0}}',
]


def test_bad_input_is_dead_lettered_and_neighbours_scored(broker, topics, state_dir):
    records: list[tuple[bytes | None, bytes]] = []
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
        assert records[int(headers["streamer.source.offset"])][1] == rec.value, "original bytes must be kept"
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
