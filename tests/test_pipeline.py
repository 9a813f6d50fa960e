"""End to end through the real broker: counts, offsets, and the step invariant."""

from __future__ import annotations

import urllib.request
from collections import Counter

import numpy as np
import orjson
import torch
from conftest import DaemonThread, event, make_config, produce, read_all, scores_of
from kafka import KafkaConsumer, TopicPartition

from models.detector import HELD, VIEWS, Detector

N_STREAMS = 300
EVENTS_PER_STREAM = 20


def interleaved_events(seed: int = 1) -> tuple[list[tuple[bytes, bytes]], dict[str, list[dict[str, float]]]]:
    """Hundreds of streams with 1-4 features each, events interleaved in a random order that
    keeps each stream's own order."""
    rng = np.random.default_rng(seed)
    per_stream: dict[str, list[dict[str, float]]] = {}
    queue: list[str] = []
    for s in range(N_STREAMS):
        name = f"machine-{s:03d}"
        k = 1 + s % 4
        level = rng.normal(0, 50, k)
        walk = np.cumsum(rng.normal(0, 1, (EVENTS_PER_STREAM, k)), axis=0) + level
        feats = [f"f{j}" for j in range(k)]
        per_stream[name] = [dict(zip(feats, map(float, row))) for row in walk]
        queue.extend([name] * EVENTS_PER_STREAM)
    rng.shuffle(queue)
    cursor = dict.fromkeys(per_stream, 0)
    records = []
    for i, name in enumerate(queue):
        values = per_stream[name][cursor[name]]
        cursor[name] += 1
        body: dict = {"stream": name, "ts": 1_700_000_000_000 + i}
        if len(values) == 1:
            body["value"] = values["f0"]  # univariate form; the feature is then called "value"
        else:
            body["values"] = values
        payload = orjson.dumps(body)
        records.append((name.encode(), payload))
    return records, per_stream


def test_every_event_scored_once_and_matches_offline_replay(broker, topics, state_dir):
    records, per_stream = interleaved_events()
    n = len(records)
    produce(broker, topics["input"], records)
    config = make_config(broker, topics, state_dir, metrics={"enabled": True, "host": "127.0.0.1", "port": 0})
    with DaemonThread(config) as daemon:
        port = daemon.metrics.serve("127.0.0.1", 0)
        daemon.wait_scored(n)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        runner = daemon.runner
        # The loop is idle now (everything is scored); copy its state before shutdown drops it.
        bank = {k: v.clone() for k, v in runner.detector.bank.tensors.items()}
        slot_of = dict(runner.slots.slot_of)

    out = scores_of(read_all(broker, topics["scores"], expect=n))
    assert len(out) == n
    keys = {(r["partition"], r["offset"]) for r in out}
    assert len(keys) == n, "an input offset was scored twice or not at all"
    assert int(daemon.metrics.scored._value.get()) == n
    flagged = Counter(r["view"] for r in out if r["is_anomaly"])
    for view in VIEWS:  # every label exists from the start; each counts the alerts its view decided
        assert f'streamer_anomalies_total{{view="{view}"}}' in body
        assert daemon.metrics.anomalies.labels(view)._value.get() == flagged.get(view, 0)

    # Batches really were multi-stream wavefronts, not one event at a time.
    assert daemon.metrics.wavefronts._sum.get() < n / 2

    # Offline: step each stream alone, one event per call, with the same weights.
    offline = Detector(runner.detector.model, runner.detector.calibration)
    by_stream: dict[str, list[dict]] = {}
    for r in sorted(out, key=lambda r: (r["partition"], r["offset"])):
        by_stream.setdefault(r["stream"], []).append(r)
    assert set(by_stream) == set(per_stream)
    for slot, (stream, evs) in enumerate(sorted(per_stream.items())):
        feats = sorted(evs[0])  # univariate streams hold one feature under a different name: order is the same
        got = by_stream[stream]
        assert len(got) == len(evs)
        for step, values in enumerate(evs):
            x = np.zeros((1, offline.max_features))
            mask = np.zeros((1, offline.max_features), dtype=bool)
            x[0, : len(feats)] = [values[f] for f in feats]
            mask[0, : len(feats)] = True
            res = offline.process(np.array([slot]), x, mask, np.array([got[step]["ts"]]))
            assert got[step]["surprise"] == np.float64(res.surprise[0]) or abs(got[step]["surprise"] - res.surprise[0]) < 1e-4
            assert abs(got[step]["score"] - res.score[0]) < 1e-6
        row = slot_of[stream]
        torch.testing.assert_close(bank["h"][row], offline.bank.tensors["h"][slot], atol=1e-5, rtol=1e-5)
        for field in ("norm_mean", "norm_var", "pred_mu", "prof_mean", "mix_var", "cal_hist", "cal_hist_prof", "steps"):
            torch.testing.assert_close(bank[field][row], offline.bank.tensors[field][slot], atol=1e-5, rtol=1e-5)

    for name in (
        "streamer_events_consumed_total",
        "streamer_events_scored_total",
        "streamer_dead_letters_total",
        "streamer_anomalies_total",
        "streamer_batch_events_bucket",
        "streamer_step_duration_seconds_bucket",
        "streamer_event_time_lag_seconds_bucket",
        "streamer_consumer_lag_records",
        "streamer_active_streams",
        "streamer_model_info",
    ):
        assert name in body, name
    assert f"streamer_active_streams {float(N_STREAMS)}" in body


def _pump_records() -> list[tuple[bytes, bytes]]:
    records = [(b"k-1", event("pump-7", 1_732_190_000_000 + i, {"temp": 70.0 + i % 3, "rpm": 1480.0 + i})) for i in range(30)]
    records.append((b"k-1", event("pump-7", 1_732_190_000_030, {"temp": 500.0, "rpm": 1510.0})))  # overheating
    records.append((b"sensor-9", b'{"ts": "2024-11-21T12:00:00Z", "value": 3.5}'))  # stream from the key, ISO ts
    return records


def test_alerts_only_when_the_scores_topic_is_null(broker, topics, state_dir):
    """`topics.scores: null`: no record per event, the alerts as usual, every event still scored
    and in the metrics, and the offsets committed."""
    records = _pump_records()
    produce(broker, topics["input"], records)
    config = make_config(broker, topics, state_dir)
    config = config.model_copy(update={"topics": config.topics.model_copy(update={"scores": None})})
    with DaemonThread(config) as daemon:
        daemon.wait_scored(len(records))
        m = daemon.metrics
        assert m.registry.get_sample_value("streamer_anomaly_score_count") == len(records)
    assert read_all(broker, topics["scores"], timeout_s=3) == []
    alerts = scores_of(read_all(broker, topics["alerts"], expect=1))
    assert [(r["stream"], r["top_feature"], r["is_anomaly"]) for r in alerts] == [("pump-7", "temp", True)]
    assert m.registry.get_sample_value("streamer_output_records_total", {"topic": topics["alerts"]}) == 1
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    parts = [TopicPartition(topics["input"], p) for p in sorted(c.partitions_for_topic(topics["input"]))]
    assert sum(c.committed(tp) or 0 for tp in parts) == len(records)
    c.close()


def test_score_record_fields(broker, topics, state_dir):
    records = _pump_records()
    produce(broker, topics["input"], records)
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(len(records))
    out = scores_of(read_all(broker, topics["scores"], expect=len(records)))
    last = [r for r in out if r["stream"] == "pump-7"][-1]
    fields = {"stream", "ts", "topic", "partition", "offset", "surprise", "score", "is_anomaly"}
    fields |= {"top_feature", "view", "held", "contributions"}
    assert set(last) >= fields
    assert 0.0 <= last["score"] <= 1.0
    assert last["view"] in VIEWS
    assert next(r["view"] for r in out if r["stream"] == "pump-7") is None  # nothing to compare the first event with
    assert last["is_anomaly"] and last["top_feature"] == "temp"
    assert set(last["contributions"]) == {"rpm", "temp"}
    flagged = Counter(r["view"] for r in out if r["is_anomaly"])
    assert flagged[last["view"]] >= 1
    for view in VIEWS:  # the anomaly counter's label is the view that decided each alert
        assert daemon.metrics.anomalies.labels(view)._value.get() == flagged.get(view, 0)
    keyed = [r for r in out if r["stream"] == "sensor-9"]
    assert len(keyed) == 1 and keyed[0]["ts"] == 1_732_190_400_000


def test_held_events_say_why_and_are_counted(broker, topics, state_dir):
    """An event at or above the threshold that is reported below it says why in its record
    (`held`) and in streamer_held_events_total: a nightly job (5-minute readings, 60 deviations
    at 03:00) is an anomaly on its first two nights and a held recurrence on the third. The first
    night's record delivered twice (a producer's retry) is reported once: the second copy is a
    held duplicate at 0, and the nights after it are scored as they are without it."""
    rng = np.random.default_rng(0)
    t = np.arange(288 * 5) * 300
    v = 20.0 + 5.0 * np.sin(2 * np.pi * t / 86_400) + rng.normal(0.0, 1.0, len(t))
    v[t % 86_400 == 3 * 3600] += 60.0
    day0 = 1_732_147_200_000  # a UTC midnight
    records = [(b"host-1", orjson.dumps({"stream": "host-1", "ts": day0 + int(s) * 1000, "value": float(x)})) for s, x in zip(t, v)]
    first = int(np.flatnonzero(t == 3 * 3600)[0])
    records.insert(first + 1, records[first])
    stamps = [day0 + int(s) * 1000 + 5 for s in t]
    stamps.insert(first + 1, stamps[first])  # (a retry resends the record as it was, its timestamp too)
    produce(broker, topics["input"], records, timestamps=stamps)
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(len(records))
    out = sorted(scores_of(read_all(broker, topics["scores"], expect=len(records))), key=lambda r: r["ts"])
    again = [r for r in out if r["held"] == "duplicate"]
    assert len(again) == 1 and again[0]["ts"] == day0 + 3 * 3_600_000 and again[0]["offset"] == first + 1
    assert again[0]["score"] == 0.0 and not again[0]["is_anomaly"] and again[0]["view"] is None
    job = [r for r in out if (r["ts"] - day0) % 86_400_000 == 3 * 3_600_000 and r["held"] != "duplicate"]
    # (Warm-up is 20 events here. By the fourth night the calibration history has learned the job:
    # it no longer reaches the threshold, so there is nothing to hold.)
    assert [r["is_anomaly"] for r in job] == [True, True, False, False, False]
    assert [r["held"] for r in job[:3]] == [None, None, "recurrence"]
    assert all(r["score"] < 0.5 for r in job[2:])
    held = Counter(r["held"] for r in out)
    assert set(held) <= {None, *HELD[1:]}
    assert all(not r["is_anomaly"] and r["score"] < 0.5 for r in out if r["held"])
    assert all(r["held"] in (None, "warmup") and not r["is_anomaly"] for r in out[:20])
    for reason in HELD[1:]:
        assert daemon.metrics.held.labels(reason)._value.get() == held.get(reason, 0)


def test_a_stream_fed_through_two_partitions_is_scored_counted_and_named_once(broker, topics, state_dir, caplog):
    """A producer that does not key each stream by a stable key spreads it over partitions; its
    state lives with the partition it was first seen on (README, Input), so a rebalance would drop
    it under the other partition's events. Its events are still all scored, and the ones that
    came through another partition are counted (streamer_events_stray_total) and the stream named
    once in the log, not once per event."""
    split = [(b"a" if i % 2 else b"b", event("pump-7", 1_732_190_000_000 + i, {"temp": 70.0 + i % 3})) for i in range(40)]
    keyed = [(b"fan-1", event("fan-1", 1_732_190_000_000 + i, {"rpm": 1480.0 + i % 5})) for i in range(40)]
    produce(broker, topics["input"], split + keyed, partition_of=lambda key: {b"a": 0, b"b": 1, b"fan-1": 2}[key])
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(80)
        runner = daemon.runner
        owner = runner.slots.owner["pump-7"]
    out = scores_of(read_all(broker, topics["scores"], expect=80))
    assert Counter(r["stream"] for r in out) == {"pump-7": 40, "fan-1": 40}
    assert owner in ((topics["input"], 0), (topics["input"], 1))
    # Whichever partition pump-7 was first seen on owns it: every event of the other is a stray.
    assert daemon.metrics.registry.get_sample_value("streamer_events_stray_total") == 20
    said = [r.getMessage() for r in caplog.records if "its state belongs to" in r.getMessage()]
    assert len(said) == 1 and "'pump-7'" in said[0] and "stable key" in said[0], said
