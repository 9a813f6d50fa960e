"""`streamer demo`: broker, synthetic feed, detector and a live terminal view in one command.

Everything here is the real thing wired together in one process tree: the Tansu broker on a
free loopback port, a keyed producer, the same Runner that `streamer run` uses (in a thread),
the real /metrics endpoint, and a consumer of the alerts topic feeding the view.
"""

from __future__ import annotations

import collections
import logging
import signal
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

import orjson
from kafka import KafkaConsumer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from models.synthetic import SensorFleet
from streamer.app import build_runner, takes_sigint
from streamer.broker import EmbeddedBroker, free_port
from streamer.config import build_config
from streamer.feed import LogFeed, SensorFeed
from streamer.metrics import Metrics

log = logging.getLogger(__name__)


def _counter(metrics: Metrics, name: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


class AlertTail(threading.Thread):
    """Reads the alerts topic into a bounded list for the view."""

    def __init__(self, bootstrap: str, topic: str, keep: int = 12) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.count = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for recs in self.consumer.poll(timeout_ms=200).values():
                for r in recs:
                    self.recent.appendleft(orjson.loads(r.value))
                    self.count += 1
        self.consumer.close()


def _view(metrics: Metrics, tail: AlertTail, rate: float, port: int, bootstrap: str, elapsed: float) -> Group:
    stats = Table(expand=True, box=None)
    for col in ("events/s scored", "consumer lag (records)", "streams", "anomalies", "dead letters"):
        stats.add_column(col, justify="right")
    stats.add_row(
        f"[bold]{rate:,.0f}[/]",
        f"[bold]{_counter(metrics, 'streamer_consumer_lag_records'):,.0f}[/]",
        f"[bold]{_counter(metrics, 'streamer_active_streams'):,.0f}[/]",
        f"[bold red]{_counter(metrics, 'streamer_anomalies_total'):,.0f}[/]",
        f"[bold yellow]{_counter(metrics, 'streamer_dead_letters_total'):,.0f}[/]",
    )
    alerts = Table(title="latest anomalies (from the alerts topic)", expand=True)
    for col in ("stream", "event time", "score", "surprise"):
        alerts.add_column(col, no_wrap=True)
    alerts.add_column("what", no_wrap=True, overflow="ellipsis", ratio=1)
    for a in tail.recent:
        when = datetime.fromtimestamp(a["ts"] / 1000).strftime("%Y-%m-%d %H:%M:%S")
        what = f"feature {a['top_feature']} ({a.get('view')})" if a.get("kind") == "sensor" else f"log: {a.get('line', '')[:60]}"
        alerts.add_row(a["stream"], when, f"{a['score']:.3f}", f"{a['surprise']:.1f}", what)
    footer = f"broker {bootstrap} · metrics http://127.0.0.1:{port}/metrics · running {elapsed:,.0f}s · Ctrl-C stops"
    return Group(Panel(stats, title="streamer demo"), alerts, footer)


def run_demo(streams: int, steps_per_second: float, metrics_port: int, duration: float | None, partitions: int = 4) -> int:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamer-demo-") as state_dir:
        cfg = build_config(
            {
                "kafka": {"bootstrap_servers": broker.bootstrap},
                "consumer": {"group_id": "streamer-demo", "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
                "state": {"dir": state_dir},
                "metrics": {"host": "127.0.0.1", "port": metrics_port},
                "logs": {"topics": ["logs"], "stream_field": "service"},
            },
            env={},  # the demo's own broker: a STREAMER_BOOTSTRAP_SERVERS meant for `run` must not point it at a real cluster
        )
        t = cfg.topics
        assert t.scores is not None  # (the demo's config: the default topics)
        broker.create_topics({t.inputs[0]: partitions, "logs": 2, t.scores: partitions, t.alerts: 1, t.dead_letter: 1})
        metrics = Metrics()
        runner = build_runner(cfg, metrics)
        try:
            port = metrics.serve(cfg.metrics.host, cfg.metrics.port, runner.health)
        except OSError:
            port = metrics.serve(cfg.metrics.host, free_port(), runner.health)
        backfill = 600
        fleet = SensorFleet(n_streams=streams, seed=7, start_ms=int(time.time() * 1000) - backfill * 60_000)
        feed = SensorFeed(broker.bootstrap, t.inputs[0], fleet, steps_per_second, backfill_steps=backfill, garbage_every=5000)
        log_feed = LogFeed(broker.bootstrap, "logs")
        tail = AlertTail(broker.bootstrap, t.alerts)
        threads = [
            threading.Thread(target=runner.run, name="runner"),
            threading.Thread(target=feed.run, name="feed"),
            threading.Thread(target=log_feed.run, name="log-feed"),
            tail,
        ]
        stop = threading.Event()
        # Ctrl-C too is a request the loop below takes at its next wait, not a KeyboardInterrupt
        # that may land inside the live view's machinery (in `streamer train` one landing inside
        # the progress bar's killed the process by the signal after its message).
        asked = [signal.SIGTERM, signal.SIGINT] if takes_sigint() else [signal.SIGTERM]
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in asked}
        for th in threads:
            th.start()
        started = time.monotonic()
        last_scored, last_t = 0.0, started
        rate = 0.0
        try:
            with Live(refresh_per_second=4, transient=False) as live:
                while not stop.is_set() and (duration is None or time.monotonic() - started < duration):
                    stop.wait(0.5)
                    now = time.monotonic()
                    scored = _counter(metrics, "streamer_events_scored_total")
                    rate = 0.7 * rate + 0.3 * (scored - last_scored) / max(now - last_t, 1e-6)
                    last_scored, last_t = scored, now
                    live.update(_view(metrics, tail, rate, port, broker.bootstrap, now - started))
        except KeyboardInterrupt:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            feed.stop()
            log_feed.stop()
            runner.stop()
            tail.stop_event.set()
            for th in threads:
                th.join(timeout=15)
        print(
            f"\nstopped: {_counter(metrics, 'streamer_events_scored_total'):,.0f} events scored, "
            f"{_counter(metrics, 'streamer_anomalies_total'):,.0f} anomalies, "
            f"{_counter(metrics, 'streamer_dead_letters_total'):,.0f} dead letters"
        )
    return 0
