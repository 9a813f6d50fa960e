"""What the daemon writes: score records, alerts and dead letters, built from a batch's results.

Pure functions of a polled batch and what the detector made of it (no Kafka I/O, no metrics),
so the record formats the README documents live in one place and are testable without a broker.
"""

from __future__ import annotations

import numpy as np
import orjson

from models.detector import HELD, VIEWS, BatchResult
from streamer.config import Config
from streamer.decode import Decoded
from streamer.transport import Headers, OutRecord, Polled

# Score records name the deciding view; the extra None is for events with nothing to compare.
_VIEW_NAMES = np.array([*VIEWS, None], dtype=object)
_HELD_NAMES = np.array([None, *HELD[1:]], dtype=object)
# Bytes of a dead letter's record taken by the headers the daemon adds and Kafka's framing.
DEAD_LETTER_OVERHEAD = 4096
# Kafka frames each header with two varints (the lengths of its name and value), up to 5 bytes each.
HEADER_FRAMING = 10


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: Headers, room: int, max_value: int
) -> tuple[bytes | None, bytes | None, Headers, Headers]:
    """The original key, value and headers of a dead letter, made sendable: returns them plus
    the headers to add.

    Kafka allows null header values, which kafka-python's producer refuses: they become empty.
    A header of the input named like the daemon's own (`streamer.reason`, ...) is kept as
    `original.<name>`, so a reader taking the first or the last header of a name gets the
    daemon's. A value is kept up to `max_value` bytes (input.max_message_bytes: only an
    `oversized` record is longer, and a dead-letter topic with the broker's default 1 MB limit
    would refuse it for good, however large the input topic's limit is). The record must also
    fit the producer's max_request_size (`room` bytes here): where the key and headers take over
    half of it they are dropped (`streamer.dropped` says so) and the value is cut to the rest. A
    send refused for size is refused on every retry, which would stall the partition for good.
    Whatever is cut stays in the source topic, at the offset the dead letter names. A tombstone
    keeps its null value unless it has no key (Kafka needs one of them).
    """
    original: Headers = [(f"original.{k}" if k.startswith("streamer.") else k, b"" if v is None else v) for k, v in headers]
    extra: Headers = []

    def framing() -> int:
        return len(key or b"") + sum(len(k.encode()) + len(v or b"") + HEADER_FRAMING for k, v in original)

    size = len(value) if value is not None else 0
    if size > max_value or framing() + size > room:
        if framing() > room // 2:
            extra.append(("streamer.dropped", f"key of {len(key or b'')} bytes, {len(original)} headers".encode()))
            key, original = None, []
        if value is not None and (size > max_value or framing() + size > room):
            extra.append(("streamer.truncated", str(size).encode()))
            value = value[: max(0, min(max_value, room - framing()))]
    if value is None and key is None:
        value = b""
    return key, value, original, extra


def dead_letter(config: Config, polled: Polled, pos: int, reason: str, detail: str) -> OutRecord:
    """The dead letter of the record at `pos`: the original, made sendable, with the reason and
    the record's coordinates in `streamer.*` headers (so it can be found, fixed and replayed)."""
    key, value, original, extra = fit_dead_letter(
        polled.key[pos],
        polled.value[pos],
        polled.headers[pos],
        config.producer.max_request_size - DEAD_LETTER_OVERHEAD,
        config.input.max_message_bytes,
    )
    headers: Headers = [
        *original,
        *extra,
        ("streamer.reason", reason.encode()),
        ("streamer.error", detail.encode()[:1000]),
        ("streamer.source.topic", polled.topic[pos].encode()),
        ("streamer.source.partition", str(int(polled.partition[pos])).encode()),
        ("streamer.source.offset", str(int(polled.offset[pos])).encode()),
    ]
    return OutRecord(config.topics.dead_letter, key, value, headers)


def score_records(
    config: Config,
    polled: Polled,
    dec: Decoded,
    res: BatchResult,
    emitted: np.ndarray,
    schemas: dict[str, tuple[str, ...]],
    version: str,
) -> list[OutRecord]:
    """Score records of the emitted events (to `topics.scores`, when set) and alerts of the
    anomalous ones (to `topics.alerts`), keyed by stream so a stream's records stay in order."""
    topics = config.topics
    top = res.top_feature(dec.mask).tolist()
    surprise = res.surprise.tolist()
    score = res.score.tolist()
    anomaly = res.is_anomaly.tolist()
    contrib = res.contributions.tolist()
    present = dec.mask.tolist()
    view = _VIEW_NAMES[np.where(res.valid, res.view, len(VIEWS))].tolist()
    held = _HELD_NAMES[res.held].tolist()
    ts = dec.ts_ms.tolist()
    out: list[OutRecord] = []
    # (Alerts only: the other events' records are not even built.)
    wanted = emitted if topics.scores is not None else emitted & res.is_anomaly
    for j, pos in enumerate(dec.index.tolist()):
        if not wanted[j]:
            continue
        stream = dec.stream[j]
        names = schemas[stream]
        here = present[j]
        record = {
            "kind": "sensor",
            "stream": stream,
            "ts": ts[j],
            "topic": polled.topic[pos],
            "partition": int(polled.partition[pos]),
            "offset": int(polled.offset[pos]),
            "surprise": surprise[j],
            "score": score[j],
            "is_anomaly": anomaly[j],
            "top_feature": names[top[j]] if top[j] >= 0 else None,
            "view": view[j],
            "held": held[j],
            "contributions": {name: c for name, c, p in zip(names, contrib[j], here) if p},
            "model_version": version,
        }
        value = orjson.dumps(record)
        key = stream.encode()
        if topics.scores is not None:
            out.append(OutRecord(topics.scores, key, value))
        if anomaly[j]:
            out.append(OutRecord(topics.alerts, key, value))
    return out
