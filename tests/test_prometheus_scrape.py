"""A real scrape, end to end: Debian's Prometheus scrapes the daemon started by its CLI.

The daemon runs as `python3 -m streamer.cli run --config FILE` against the embedded broker, with
/metrics on a loopback port; Prometheus scrapes it every second and evaluates
deploy/prometheus/alerts.yml. Synthetic sensor events (and a few broken records) are produced in
chunks while both run. The assertions then use the dashboards' own expressions (read from the
committed JSON, with Grafana's variables filled in) through the HTTP API, the same way Grafana
would, and check the alert rules evaluate without error, the dead-letter alert is pending and
the availability alerts are not. Finally SIGTERM must drain the daemon to exit code 0, and
Prometheus must then record the target as down.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import produce
from test_deploy import PROM_DIR, REPO, PrometheusServer, dashboard_exprs, ensure_debian_tool, grafana_to_promql, load_dashboards, panels

from models.synthetic import SensorFleet
from streamer.broker import EmbeddedBroker, free_port
from streamer.feed import GARBAGE, sensor_events
from streamer.metrics import SCORE_BUCKETS

JOB = "streamer"  # what alerts.yml selects, so the rules evaluate against this daemon
STREAMS, STEPS_PER_CHUNK, CHUNKS = 40, 20, 4

# Dashboard queries allowed to come back empty on a short, healthy run.
MAY_BE_EMPTY = {
    "annotation Daemon start / model load",  # changes() needs the model to be loaded twice
}


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _wait(what: str, ok: Callable[[], bool], timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.2)
    tail = f"\n--- log ---\n{log.read_text()[-3000:]}" if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{tail}")


class DaemonProcess:
    """`streamer run` as a subprocess, stopped with SIGTERM like an orchestrator would."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamer.cli", "run", "--config", str(self.config_path)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # As in the images and the systemd unit: no *_created series.
                env={**os.environ, "PROMETHEUS_DISABLE_CREATED_SERIES": "True"},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the drain; SIGKILL only if it overruns."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not drain within {timeout_s}s:\n{self.log_path.read_text()[-3000:]}") from None
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    daemon: DaemonProcess
    prom: PrometheusServer
    metrics_base: str  # the daemon's http://host:port


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return ensure_debian_tool("prometheus", "prometheus")


@pytest.fixture
def stack(prometheus_binary: str, broker: EmbeddedBroker, topics: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """The daemon (CLI subprocess) and a Prometheus scraping it every second; both always stopped."""
    port = free_port()
    daemon = DaemonProcess(
        {
            "kafka": {"bootstrap_servers": broker.bootstrap},
            "consumer": {
                "group_id": f"g-{topics['input']}",
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 500,
                "max_poll_records": 500,
                "poll_timeout_ms": 100,
            },
            "topics": {"inputs": [topics["input"]], "scores": topics["scores"], "alerts": topics["alerts"], "dead_letter": topics["dead"]},
            "detector": {"warmup": 10, "device": "cpu"},
            "state": {"dir": str(tmp_path / "state")},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": port},
            "log_format": "json",
        },
        tmp_path,
    )
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = PrometheusServer(
        prometheus_binary,
        prom_dir,
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROM_DIR / "alerts.yml")],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        },
    )
    try:
        daemon.start()
        prom.start()
        yield Stack(daemon, prom, f"http://127.0.0.1:{port}")
    finally:
        daemon.kill()
        prom.stop()


def _scalar(answer: dict[str, Any]) -> list[float]:
    assert answer["status"] == "success", answer
    return [float(r["value"][1]) for r in answer["data"]["result"]]


def _panel_exprs(uid: str, title: str) -> list[str]:
    (dash,) = [d for d in load_dashboards().values() if d["uid"] == uid]
    (panel,) = [p for p in panels(dash) if p["title"] == title]
    return [t["expr"] for t in panel["targets"]]


def test_prometheus_scrapes_the_daemon_and_dashboards_and_alerts_work(stack: Stack, broker: EmbeddedBroker, topics: dict[str, str]) -> None:
    daemon, prom, base = stack.daemon, stack.prom, stack.metrics_base
    _wait("the daemon to join its group (/readyz 200)", lambda: _http_status(f"{base}/readyz") == 200, 90, daemon.log_path)
    # Prometheus hands new targets to its scrape loop only every 5 s: wait for two scrapes of
    # the idle daemon, so every counter has a baseline sample before anything moves it.
    _wait(
        "two successful scrapes before producing",
        lambda: _scalar(prom.query(f'count_over_time(up{{job="{JOB}"}}[1m]) and up{{job="{JOB}"}} == 1')) >= [2.0],
        30,
    )

    # Produce while Prometheus scrapes, so counters move between scrapes and rates are non-zero.
    fleet = SensorFleet(n_streams=STREAMS, seed=5)
    valid = 0
    for chunk in range(CHUNKS):
        records: list[tuple[bytes | None, bytes]] = list(sensor_events(fleet, chunk * STEPS_PER_CHUNK, STEPS_PER_CHUNK, wall_clock=True))
        valid += len(records)
        if chunk == 1:
            # 20 of each: about 1% of the records per reason, over StreamerDeadLetters' 0.1%.
            records += [(b"broken", value) for value in GARBAGE * 20]
        produce(broker, topics["input"], records)
        time.sleep(1.0)
    assert daemon.alive(), daemon.log_path.read_text()[-3000:]

    def scraped_all() -> bool:
        values = _scalar(prom.query(f'streamer_events_scored_total{{job="{JOB}"}}'))
        return bool(values) and values[0] >= valid

    _wait(f"Prometheus to scrape {valid} scored events", scraped_all, 60, daemon.log_path)
    time.sleep(2.0)  # a few more scrapes after the last batch
    assert _scalar(prom.query(f'count_over_time(up{{job="{JOB}"}}[5m])'))[0] >= 5

    def q(expr: str) -> dict[str, Any]:
        return prom.query(grafana_to_promql(expr, job=JOB, rate_interval="1m", range_="5m"))

    # Throughput: the overview's scored-events stat.
    (scored_rate,) = _scalar(q(_panel_exprs("streamer-overview", "Events scored /s")[0]))
    assert 0 < scored_rate < 1e6
    consumed = {
        r["metric"]["topic"]: float(r["value"][1]) for r in q(_panel_exprs("streamer-overview", "Events per second")[0])["data"]["result"]
    }
    assert consumed.get(topics["input"], 0) > 0

    # Consumer lag, per topic and per partition (the input has four).
    lag = _scalar(q(_panel_exprs("streamer-overview", "Consumer lag by topic")[0]))
    assert lag and all(v >= 0 for v in lag)
    per_partition = q(_panel_exprs("streamer-overview", "Most lagging partitions")[0])["data"]["result"]
    assert per_partition and {r["metric"]["partition"] for r in per_partition} <= {"0", "1", "2", "3"}

    # Latency percentiles: finite, positive, below the largest bucket.
    for uid, title in (("streamer-capacity", "Model step duration"), ("streamer-overview", "Batch duration")):
        for expr in _panel_exprs(uid, title):
            (value,) = _scalar(q(expr))
            assert math.isfinite(value) and 0 < value <= 10.0, f"{title}: {value}"

    # Dead letters: the broken records, by reason.
    by_reason = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in q(_panel_exprs("streamer-overview", "Dead letters in range")[0])["data"]["result"]
    }
    assert by_reason["invalid_json"] > 0 and by_reason["not_an_object"] > 0 and by_reason["non_finite"] > 0
    assert by_reason["oversized"] == 0

    # Score distribution: every bucket present, cumulative, the +Inf bucket counting every score.
    buckets = {
        r["metric"]["le"]: float(r["value"][1]) for r in q(_panel_exprs("streamer-model", "Scores in range by bucket")[0])["data"]["result"]
    }
    assert len(buckets) == len(SCORE_BUCKETS) + 1 and buckets["+Inf"] > 0
    ordered = [buckets[le] for le in sorted(buckets, key=lambda le: math.inf if le == "+Inf" else float(le))]
    assert ordered == sorted(ordered), f"buckets not cumulative: {buckets}"
    (mean_score,) = _scalar(q(_panel_exprs("streamer-model", "Mean score")[0]))
    assert 0.0 <= mean_score <= 1.0
    shares = [_scalar(q(expr)) for expr in _panel_exprs("streamer-model", "Share of scores above thresholds")]
    assert all(len(s) == 1 and 0.0 <= s[0] <= 1.0 for s in shares)

    # Every query of every dashboard evaluates, and all but the listed ones have data.
    empty = []
    for name, where, expr in dashboard_exprs():
        answer = q(expr)
        assert answer["status"] == "success", f"{name} / {where}: {answer}"
        if not answer["data"]["result"] and where not in MAY_BE_EMPTY:
            empty.append(f"{name} / {where}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # The alert rules run against this data: no evaluation errors; dead letters pending (for:
    # 1m), the availability alerts inactive.
    rules = {r["name"]: r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    assert len(rules) == 11
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"

    def dead_letter_alert_pending() -> bool:
        rules = {r["name"]: r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
        return rules["StreamerDeadLetters"]["state"] in ("pending", "firing")

    _wait("StreamerDeadLetters to be pending", dead_letter_alert_pending, 10)
    rules = {r["name"]: r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    quiet = ("StreamerDown", "StreamerAbsent", "StreamerNoProgress", "StreamerOutputsNotAcknowledged", "StreamerConsumerLagGrowing")
    for name in (*quiet, "StreamerSnapshotsFailing", "StreamerBrokerUnreachable", "StreamerCheckpointRefused", "StreamerRestarting"):
        assert rules[name]["state"] == "inactive", f"{name} is {rules[name]['state']}"

    # SIGTERM drains and exits 0; Prometheus then sees the target down (StreamerDown's input).
    assert daemon.terminate() == 0, daemon.log_path.read_text()[-3000:]
    _wait("up == 0 after the daemon stopped", lambda: _scalar(prom.query(f'up{{job="{JOB}"}}')) == [0.0], 15)
