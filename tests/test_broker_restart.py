"""A memory-only broker restarts under a running daemon: it rejoins and scores the new log."""

from __future__ import annotations

import time

from conftest import DaemonThread, event, make_config, produce, read_all, scores_of

from streamer.broker import EmbeddedBroker

TOPICS = {"input": "in", "scores": "scores", "alerts": "alerts", "dead": "dead"}


def _create(broker: EmbeddedBroker) -> None:
    broker.create_topics({"in": 4, "scores": 2, "alerts": 1, "dead": 1})


def test_daemon_survives_broker_restart_and_discards_stale_snapshots(state_dir):
    broker = EmbeddedBroker().start()
    try:
        _create(broker)
        records = [(f"s{i % 10}".encode(), event(f"s{i % 10}", i, {"x": float(i % 7)})) for i in range(500)]
        produce(broker, "in", records)
        with DaemonThread(make_config(broker, TOPICS, state_dir)) as daemon:
            daemon.wait_scored(500)
            # Restart on the same port: every topic, offset and group is gone.
            broker.stop()
            time.sleep(0.5)
            broker.start()
            _create(broker)
            produce(broker, "in", records[:300])
            daemon.wait_scored(800, timeout_s=90)
        scores = scores_of(read_all(broker, "scores", expect=300))
        assert len(scores) == 300
        assert sorted((r["partition"], r["offset"]) for r in scores) == sorted(
            (r.partition, r.offset) for r in read_all(broker, "in", expect=300)
        )
    finally:
        broker.stop()
