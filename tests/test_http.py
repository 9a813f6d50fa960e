"""/metrics, /healthz and /readyz of a running daemon, scraped over HTTP."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from conftest import DaemonThread, event, make_config, produce
from prometheus_client.parser import text_string_to_metric_families


def _get(url: str, accept: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_follows_the_loop_and_metrics_carry_exemplars(broker, topics, state_dir):
    records = [(f"m-{i % 5}".encode(), event(f"m-{i % 5}", 1_000 + i, {"x": float(i % 11)})) for i in range(200)]
    produce(broker, topics["input"], records)
    config = make_config(broker, topics, state_dir)
    daemon = DaemonThread(config)
    port = daemon.metrics.serve("127.0.0.1", 0, daemon.runner.health)
    base = f"http://127.0.0.1:{port}"

    status, body = _get(f"{base}/readyz")
    assert status == 503 and "waiting for partition assignment" in body  # not started yet
    with daemon:
        daemon.wait_scored(len(records))
        assert _get(f"{base}/readyz")[0] == 200
        assert _get(f"{base}/healthz")[0] == 200
        status, text = _get(f"{base}/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["streamer_events_scored"].samples[0].value == len(records)
        assert "process_resident_memory_bytes" in families
        for name in families:
            assert "stream" not in {k for s in families[name].samples for k in s.labels}, f"{name} has a per-stream label"
        status, om = _get(f"{base}/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert 'streamer_anomaly_score_bucket{le="' in om
        assert '# {stream="m-' in om, "score histogram buckets carry the stream as an exemplar"
        # A stalled loop fails liveness.
        daemon.runner.health.last_progress -= 10_000
        status, body = _get(f"{base}/healthz")
        assert status == 503 and "no poll completed" in body
        daemon.runner.health.progress()
    status, body = _get(f"{base}/readyz")
    assert status == 503 and "shutting down" in body
    assert _get(f"{base}/nothing")[0] == 404


def test_a_member_without_partitions_is_ready(broker, state_dir):
    """More members than partitions: the idle member has joined and restored nothing, so it is
    ready (a rolling update must not wait on it forever)."""
    names = {"input": "one-part", "scores": "one-part-scores", "alerts": "one-part-alerts", "dead": "one-part-dead"}
    broker.create_topics({"one-part": 1, "one-part-scores": 1, "one-part-alerts": 1, "one-part-dead": 1})
    produce(broker, "one-part", [(b"k", event("k", 1, {"x": 1.0}))])
    first = DaemonThread(make_config(broker, names, state_dir / "a"))
    second = DaemonThread(make_config(broker, names, state_dir / "b"))
    with first, second:
        deadline = time.monotonic() + 60
        while not (first.runner.health.readiness()[0] and second.runner.health.readiness()[0]):
            assert time.monotonic() < deadline, (first.runner.health.readiness(), second.runner.health.readiness())
            time.sleep(0.1)
        owned = [len(d.runner.transport.assignment()) for d in (first, second)]
        assert sorted(owned) == [0, 1]


def test_each_bucket_exemplar_is_the_stream_of_its_largest_value():
    import numpy as np
    from prometheus_client import CollectorRegistry

    from streamer.metrics import BulkHistogram

    rng = np.random.default_rng(0)
    values = np.round(rng.lognormal(0.0, 2.0, 2_000), 1)
    values[::97] = np.nan
    streams = [f"s{i}" for i in range(len(values))]
    h = BulkHistogram("t_seconds", "test", [0.1, 1.0, 5.0, 10.0, 100.0], CollectorRegistry())
    h.observe_many(values, streams)
    idx = np.searchsorted(h.bounds, values, side="left")
    for b, ex in enumerate(h.exemplars):
        inside = np.flatnonzero((idx == b) & np.isfinite(values))
        if not len(inside):
            assert ex is None
            continue
        top = values[inside].max()
        assert ex is not None and ex.value == top
        assert ex.labels["stream"] == streams[inside[values[inside] == top][-1]]  # ties: the last one
    assert h.counts.sum() == np.isfinite(values).sum()


def test_the_kafka_clients_repeated_lines_are_held_back_and_counted():
    """In a broker outage kafka-python logged one line ~1,800 times a second (5 MB of JSON log in
    20 s). Its repeats pass once per 10 s, the next one saying how many were held back; the
    daemon's own lines all pass, since one format string covers many partitions."""
    import io
    import logging

    import orjson

    from streamer.jsonlog import JsonFormatter, Repeats

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    repeats = Repeats(every_s=10.0)
    handler.addFilter(repeats)
    kafka, ours = logging.getLogger("kafka.coordinator.test"), logging.getLogger("streamer.test")
    for log in (kafka, ours):
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.WARNING)
    try:
        for _ in range(1000):
            kafka.warning("Marking the coordinator dead (node %s)", 1001)
        kafka.warning("Marking the coordinator dead (node %s)", 1002)  # (another broker: news)
        for p in range(4):
            ours.error("could not write the snapshot of %s[%d]", "t", p)
        repeats._last = {k: (v[0] - 11.0, v[1]) for k, v in repeats._last.items()}  # (10 s later)
        kafka.warning("Marking the coordinator dead (node %s)", 1001)
    finally:
        for log in (kafka, ours):
            log.removeHandler(handler)
    lines = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert [x["logger"] for x in lines] == ["kafka.coordinator.test"] * 2 + ["streamer.test"] * 4 + ["kafka.coordinator.test"]
    assert lines[1]["message"].endswith("(node 1002)")
    assert lines[-1]["repeated"] == 999 and lines[-1]["message"] == "Marking the coordinator dead (node 1001) (repeated 999 times)"
