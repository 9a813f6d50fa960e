"""Log topics in the daemon: parse, mine templates, step the log GRU, build score records.

Each input partition of a log topic has its own `LogPartition` (Drain3 miner, stream rows,
online-learning weights), so template ids and embeddings depend only on that partition's own
lines in offset order: a restart or a rebalance restores them exactly from the partition's
snapshot, like the sensor streams' state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from models.logs.calibration import log_calibration
from models.logs.model import LogGRU, LogModelConfig
from models.logs.partition import LogPartition
from streamer.config import Config
from streamer.logformats import LEVEL_NAMES
from streamer.logparse import LogParser
from streamer.state import TP, idle_age
from streamer.transport import OutRecord, Polled

MODEL_VERSION = "log-gru-online"
# Characters of a line or template a score record carries. A line is up to
# input.max_message_bytes (64 KiB), the record holds it up to three times (line, template,
# expected template), and JSON writes a control character as six: 1.2 MB, over Kafka's usual
# 1 MB, and a send refused for size is refused on every retry. The whole line stays in the
# input topic at the offset the record names.
TEXT_CHARS = 2048


def clip(text: str | None) -> str | None:
    """`text` cut to TEXT_CHARS characters, saying how long it was."""
    if text is None or len(text) <= TEXT_CHARS:
        return text
    return f"{text[:TEXT_CHARS]}... ({len(text)} characters)"


class LogStreams:
    def __init__(self, config: Config) -> None:
        logs, inp = config.logs, config.input
        self.config = config
        self.topics = set(logs.topics)
        self.parser = LogParser(logs.line_format, logs.stream_field, inp.max_message_bytes, inp.max_stream_id_length)
        self.model = LogGRU(LogModelConfig())
        self.calibration = log_calibration(warmup=logs.warmup, threshold=logs.threshold)
        self.parts: dict[TP, LogPartition] = {}
        self.last_seen: dict[TP, dict[str, float]] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def warming_up(self) -> int:
        return sum(p.warming_up() for p in self.parts.values())

    def nbytes(self) -> int:
        """Bytes of the partitions' state banks (each partition has its own)."""
        return sum(p.detector.bank.nbytes() for p in self.parts.values())

    def part(self, tp: TP) -> LogPartition:
        part = self.parts.get(tp)
        if part is None:
            part = self.parts[tp] = LogPartition(self.model, self.calibration)
        return part

    def restore(self, tp: TP, payload: dict[str, Any], idle_s: Any, now: float) -> int:
        """Restore a partition's streams, each as idle as it was when the snapshot was written
        (`idle_s`: stream -> seconds; a stream it does not name counts as just seen). Without
        this a restored stream that never spoke again was never evicted, and every later snapshot
        carried it on."""
        part = self.parts[tp] = LogPartition.restore(payload, calibration=self.calibration)
        idle = idle_s if isinstance(idle_s, dict) else {}
        self.last_seen[tp] = {s: now - (idle_age(idle.get(s)) or 0.0) for s in part.slot_of}
        return len(part)

    def idle_ages(self, tp: TP, now: float) -> dict[str, float]:
        """Seconds each stream of the partition has been silent, for its snapshot."""
        return {s: now - t for s, t in self.last_seen.get(tp, {}).items()}

    def snapshot(self, tp: TP) -> dict[str, Any] | None:
        part = self.parts.get(tp)
        return part.snapshot() if part is not None else None

    def evict_idle(self, now: float, max_idle_s: float) -> int:
        """Forget streams silent for longer than max_idle_s (wall clock); returns how many."""
        evicted = 0
        for tp, seen in self.last_seen.items():
            idle = [s for s, t in seen.items() if now - t > max_idle_s]
            if idle and tp in self.parts:
                self.parts[tp].forget(idle)
            for s in idle:
                del seen[s]
            evicted += len(idle)
        return evicted

    def drop(self, tp: TP) -> int:
        self.last_seen.pop(tp, None)
        part = self.parts.pop(tp, None)
        return len(part) if part is not None else 0

    def process(self, polled: Polled, emit: np.ndarray, now: float) -> tuple[list[OutRecord], list[tuple[int, str, str]], dict[str, Any]]:
        """Score a batch of log records (any partitions) polled at `now` (the runner's clock, which
        eviction compares with). Returns score/alert records, dead letters as (position, reason,
        detail), and per-batch figures for the metrics."""
        topics = self.config.topics
        parsed = self.parser.parse(polled.value, polled.key, polled.timestamp_ms)
        out: list[OutRecord] = []
        scores: list[np.ndarray] = []
        lags: list[np.ndarray] = []
        streams: list[str] = []
        anomalies = replayed = wavefronts = 0
        tps = np.array([f"{t}\0{p}" for t, p in zip(polled.topic, polled.partition.tolist())], dtype=object)
        row_tp = tps[parsed.index] if len(parsed) else np.zeros(0, dtype=object)
        for key in dict.fromkeys(row_tp.tolist()):
            topic, _, part_s = key.partition("\0")
            rows = np.flatnonzero(row_tp == key)
            sub = parsed.take(rows)
            tp = (topic, int(part_s))
            res = self.part(tp).process(sub.stream, sub.ts_ms, sub.level, sub.message)
            self.last_seen.setdefault(tp, {}).update(dict.fromkeys(sub.stream, now))
            wavefronts += res.wavefronts
            emitted = emit[sub.index]
            replayed += int(len(emitted) - emitted.sum())
            shown = np.flatnonzero(emitted)
            scores.append(res.score[shown])
            lags.append(res.ts_ms[shown].astype(np.float64))
            streams.extend(res.stream[j] for j in shown.tolist())
            anomalies += int(res.is_anomaly[shown].sum())
            # Alerts only (no scores topic): a record is built for the alerts alone, since building
            # and serialising one per line is most of this loop's cost.
            built = shown if topics.scores is not None else shown[res.is_anomaly[shown]]
            for j in built.tolist():
                pos = int(sub.index[j])
                record = res.record(j)
                level = int(sub.level[j])
                record.update(
                    kind="log",
                    topic=topic,
                    partition=int(part_s),
                    offset=int(polled.offset[pos]),
                    entry=int(sub.entry[j]),
                    level=LEVEL_NAMES[level] if 0 < level < len(LEVEL_NAMES) else None,
                    line=clip(sub.message[j]),
                    model_version=MODEL_VERSION,
                )
                record["template"], record["expected_template"] = clip(record["template"]), clip(record["expected_template"])
                value = orjson.dumps(record)
                key_b = record["stream"].encode()
                if topics.scores is not None:
                    out.append(OutRecord(topics.scores, key_b, value))
                if record["is_anomaly"]:
                    out.append(OutRecord(topics.alerts, key_b, value))
        stats = {
            "scored": len(streams),
            "replayed": replayed,
            "anomalies": anomalies,
            "wavefronts": wavefronts,
            "scores": np.concatenate(scores) if scores else np.zeros(0),
            "ts_ms": np.concatenate(lags) if lags else np.zeros(0),
            "streams": streams,
        }
        return out, list(parsed.dead), stats
