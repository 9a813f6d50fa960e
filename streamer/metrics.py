"""Every metric the daemon exports, owned by one object that takes a registry.

Names follow Prometheus conventions: base units, `_total` counters, `_seconds` histograms,
and no per-stream labels (stream ids are unbounded; they travel in the score topic). Per-event
histograms (event-time lag, scores) are filled a batch at a time with numpy, because
prometheus-client's `observe` is a Python call per value, which the hot loop cannot afford.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from models.detector import HELD, VIEWS
from streamer.decode import REASONS

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
# The score is -log10(p)/6: sixths are decades of p (0.5 = p <= 1e-3, the default threshold).
SCORE_BUCKETS = (0.1, 1 / 6, 0.25, 2 / 6, 0.5, 4 / 6, 0.75, 5 / 6, 1.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)
# streamer_model_reloads_total's `result` label.
RELOAD_RESULTS = ("kept_state", "reset_state", "failed")
# streamer_anomalies_total's `view` label: the sensor views (models/detector.py VIEWS), and log.
ANOMALY_VIEWS = (*VIEWS, "log")


class BulkHistogram(Collector):
    """A histogram fed whole numpy arrays; exposes the standard _bucket/_sum/_count series.

    Each bucket keeps one exemplar: the stream of the largest value that fell into it in the
    latest batch, so a dashboard can jump from a slow or anomalous bucket to a stream id
    without a per-stream label (exemplars appear in the OpenMetrics exposition).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: +Inf overflow
        self.total = 0.0
        self.exemplars: list[Exemplar | None] = [None] * (len(buckets) + 1)
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray, streams: Sequence[str] | None = None) -> None:
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            return
        idx = np.searchsorted(self.bounds, values, side="left")
        binned = np.bincount(idx[finite], minlength=len(self.counts))
        exemplars: dict[int, Exemplar] = {}
        if streams is not None:
            # Largest value per bucket: sorted by value, bucket indices never decrease, so each
            # bucket's last position is where the next index differs (no per-value Python work).
            order = np.flatnonzero(finite)[np.argsort(values[finite], kind="stable")]
            sorted_idx = idx[order]
            ends = np.flatnonzero(np.r_[sorted_idx[1:] != sorted_idx[:-1], True])
            now = time.time()
            exemplars = {int(sorted_idx[j]): Exemplar({"stream": streams[int(order[j])][:100]}, float(values[order[j]]), now) for j in ends}
        with self._lock:
            self.counts += binned
            self.total += float(values[finite].sum())
            for b, ex in exemplars.items():
                self.exemplars[b] = ex

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self.counts)
            total = self.total
            exemplars = list(self.exemplars)
        names = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        buckets: list[Any] = []
        for name, count, ex in zip(names, cumulative, exemplars):
            buckets.append((name, float(count), ex) if ex is not None else (name, float(count)))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total)
        yield family


def _labelled_counter(name: str, documentation: str, label: str, values: Sequence[str], registry: CollectorRegistry) -> Counter:
    """A counter with one label whose every value is exported from the start (at 0): rate() and
    increase() need a series before its first event, and an alert on a reason must see it."""
    counter = Counter(name, documentation, [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:  # process_*, python_gc_*, python_info: the process-level view
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.consumed = Counter("streamer_events_consumed", "Input records read from Kafka.", ["topic"], registry=r)
        self.scored = Counter("streamer_events_scored", "Events stepped through the model and scored.", registry=r)
        self.replayed = Counter(
            "streamer_events_replayed",
            "Records re-read after a restore without outputs: events stepped only to rebuild state (their scores were already "
            "emitted), bad records already dead-lettered.",
            registry=r,
        )
        self.dead_letters = _labelled_counter("streamer_dead_letters", "Input records sent to the dead-letter topic.", "reason", REASONS, r)
        self.anomalies = _labelled_counter(
            "streamer_anomalies",
            "Events flagged as anomalous, by what flagged them: the deciding view of a sensor event, or log.",
            "view",
            ANOMALY_VIEWS,
            r,
        )
        self.held = _labelled_counter(
            "streamer_held_events",
            "Sensor events at or above the threshold reported below it: an aftershock of a recent alert, a recurrence "
            "of something flagged at this hour on each of the last days (a nightly job), or the stream's warm-up.",
            "reason",
            HELD[1:],
            r,
        )
        self.output_records = Counter("streamer_output_records", "Records acknowledged by the broker.", ["topic"], registry=r)
        self.send_failures = Counter("streamer_send_failures", "Output batches not acknowledged (then resent).", registry=r)
        self.commit_failures = Counter("streamer_commit_failures", "Offset commits rejected by the group coordinator.", registry=r)
        self.evicted = Counter("streamer_streams_evicted", "Streams dropped after being idle.", registry=r)
        self.stray_events = Counter(
            "streamer_events_stray",
            "Sensor events of a stream whose state belongs to another input partition (a producer without a stable key per stream).",
            registry=r,
        )
        self.snapshots = Counter("streamer_snapshots", "Partition state snapshots written.", registry=r)
        self.snapshot_failures = Counter(
            "streamer_snapshot_failures", "Partition state snapshots that could not be written (the previous one stands).", registry=r
        )
        self.model_reloads = _labelled_counter(
            "streamer_model_reloads",
            "Replaced checkpoints noticed: served keeping states, served resetting them, or refused.",
            "result",
            RELOAD_RESULTS,
            r,
        )
        self.batch_events = Histogram("streamer_batch_events", "Records per polled batch.", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "streamer_step_duration_seconds", "Time to step the model over one batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "streamer_batch_duration_seconds",
            "Poll-to-commit time of one batch: decode, step, produce and wait for acks, commit.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.wavefronts = Histogram("streamer_batch_wavefronts", "GRU wavefronts per batch.", buckets=BATCH_BUCKETS, registry=r)
        self.event_lag = BulkHistogram(
            "streamer_event_time_lag_seconds", "From the event's own timestamp to its score being produced.", LAG_BUCKETS, r
        )
        self.e2e_latency = BulkHistogram(
            "streamer_end_to_end_latency_seconds",
            "From the input record's Kafka timestamp to its outputs being acknowledged.",
            LAG_BUCKETS,
            r,
        )
        self.scores = BulkHistogram("streamer_anomaly_score", "Distribution of calibrated anomaly scores.", SCORE_BUCKETS, r)
        self.warming_up = Gauge("streamer_streams_warming_up", "Streams still inside their warm-up (nothing flagged yet).", registry=r)
        self.device_memory = Gauge(
            "streamer_device_memory_bytes", "Memory allocated by torch on the detector's device (0 on cpu: see process_*).", registry=r
        )
        self.checkpoint_refused = Gauge(
            "streamer_checkpoint_refused",
            "1 while the checkpoint file is not the model served (refused or not served when it changed, or gone).",
            registry=r,
        )
        self.model_loaded = Gauge("streamer_model_loaded_timestamp_seconds", "Unix time the current model was loaded.", registry=r)
        self.consumer_lag = Gauge(
            "streamer_consumer_lag_records",
            "Records behind the fetch high-water mark, per assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.active_streams = Gauge("streamer_active_streams", "Streams with state in the bank.", registry=r)
        self.assigned_partitions = Gauge("streamer_assigned_partitions", "Input partitions assigned to this member.", registry=r)
        self.broker_reachable = Gauge(
            "streamer_broker_reachable",
            "1 when the last look at the brokers got an answer: records fetched, a batch acknowledged, an assignment, "
            "or, while idle, the log ends asked for.",
            registry=r,
        )
        self.broker_reachable.set(1)
        self.state_bytes = Gauge("streamer_state_bytes", "Bytes of the sensor and log streams' state banks.", registry=r)
        self.last_progress = Gauge("streamer_last_progress_timestamp_seconds", "Unix time the loop last completed a poll.", registry=r)
        self.model = Info("streamer_model", "The loaded model.", registry=r)

    def serve(self, host: str, port: int, health: Any = None) -> int:
        """Start /metrics (and /healthz, /readyz) in a thread; returns the bound port (0 picks one)."""
        from streamer.health import serve

        return serve(self.registry, host, port, health)
