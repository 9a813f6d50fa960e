"""Decoding: raw Kafka values to columns the detector can step, or to dead letters with a reason.

JSON parsing is the one unavoidable per-event Python step, so it is kept to a single pass with
orjson and every check is a cheap type test. Anything the detector could not score (bad JSON,
no stream id, a value that is not a finite number or is too large to hold, more features than the model
has channels) is sent back with a reason instead of raising, so one bad producer cannot stop the daemon.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import orjson

from models.detector import MAX_ABS_VALUE

# Timestamps travel as int64 epoch milliseconds.
TS_MIN, TS_MAX = -(2**63), 2**63 - 1

log = logging.getLogger(__name__)

# Dead-letter reasons; the metric label and the `streamer.reason` header use these strings.
# `parse_error` is the net under the others: an exception no check foresaw (a bug) dead-letters
# the record it met, with the exception in `streamer.error`, instead of stopping the daemon.
REASONS = (
    "tombstone",
    "oversized",
    "invalid_json",
    "not_an_object",
    "missing_stream",
    "invalid_stream",
    "invalid_timestamp",
    "missing_values",
    "non_numeric",
    "non_finite",
    "out_of_range",
    "too_many_features",
    "invalid_feature",
    "parse_error",
    "unreadable",  # the Kafka client could not parse the record (streamer/transport.py)
)


def unforeseen(pos: int, err: Exception) -> tuple[int, str, str]:
    """The dead letter (position, reason, detail) for an exception no check foresaw while parsing
    the record at `pos` (a bug): the net under the reasons above, shared by the sensor and log
    parsers, so that no record can stop the daemon."""
    detail = f"{type(err).__name__}: {err}"[:500]
    log.warning("record at position %d of the poll could not be parsed (%s); dead-lettered as parse_error", pos, detail)
    return pos, "parse_error", detail


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """Valid events as columns (index = position in the poll) plus the rejected positions."""

    index: np.ndarray  # int64 [N] positions in the Polled batch
    stream: list[str]
    ts_ms: np.ndarray  # int64 [N]
    x: np.ndarray  # float64 [N, F]
    mask: np.ndarray  # bool [N, F]
    own_ts: np.ndarray  # bool [N]: the event carries its own time (else ts_ms is its record's)
    dead: list[tuple[int, str, str]] = field(default_factory=list)  # (position, reason, detail)


def fine_epoch_ms(v: int | float) -> int:
    """Epoch milliseconds from a number that may be micro- or nanoseconds (as OpenTelemetry and
    Loki write them): 1e14 ms is the year 5138, so a value that large is taken as µs, and from
    1e17 as ns. Read as milliseconds they were dates millions of years ahead, whose hours
    meant nothing to the time-of-day profile and whose timing scored 1.0."""
    a = abs(v)
    if a >= 1e17:
        return checked_ms(v // 1_000_000 if isinstance(v, int) else v / 1e6)
    if a >= 1e14:
        return checked_ms(v // 1000 if isinstance(v, int) else v / 1e3)
    return checked_ms(v)


def checked_ms(ms: int | float) -> int:
    """ms as int epoch milliseconds, or rejected where int64 cannot hold it (numpy would raise
    OverflowError for the whole batch)."""
    if not TS_MIN <= ms <= TS_MAX:
        raise Rejected("invalid_timestamp", "ts is out of the int64 epoch-milliseconds range")
    return int(ms)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


def epoch_ms(dt: datetime) -> int:
    """Milliseconds since 1970 of an aware datetime, exactly: int(dt.timestamp() * 1000) goes
    through a float and came out 1 ms early for a few percent of millisecond timestamps."""
    return (dt - _EPOCH) // _MS


# Python 3.10's fromisoformat reads only 3 or 6 digits of fractional seconds, so the 7 of .NET
# (Serilog) and the 9 of Go, Docker and OpenTelemetry were rejected there; 3.11 reads any.
_OLD_ISO_PARSER = sys.version_info < (3, 11)
_FRACTION = re.compile(r"(?<=:\d\d)\.(\d+)")


def _six_digits(m: re.Match[str]) -> str:
    return "." + m.group(1)[:6].ljust(6, "0")


# A number below this is epoch seconds (1e11 ms is March 1973, 1e11 s the year 5138), as the
# log path reads it: Python's time.time() and Unix tools write seconds, and read as milliseconds
# a day of 5-minute readings fell within 86 s of 1970-01-21, where the time-of-day profile and
# the recurrence memory never saw a second hour.
SECONDS_BELOW = 1e11


def parse_ts(raw: Any, fallback_ms: int) -> int:
    """Epoch milliseconds from a number (seconds below SECONDS_BELOW, then ms; µs or ns by size,
    `fine_epoch_ms`) or an ISO-8601 string; fallback when absent."""
    if raw is None:
        return fallback_ms
    if isinstance(raw, bool):
        raise Rejected("invalid_timestamp", "ts must be epoch milliseconds or ISO-8601")
    if isinstance(raw, (int, float)):
        if isinstance(raw, float) and not math.isfinite(raw):  # (an int of 400 digits overflows isfinite)
            raise Rejected("invalid_timestamp", "ts is not finite")
        if abs(raw) < SECONDS_BELOW:
            return checked_ms(raw * 1000)
        return fine_epoch_ms(raw) if abs(raw) < 1e19 else checked_ms(raw)
    if isinstance(raw, str):
        # (RFC 3339 allows a lowercase z, and a trailing newline or space is a writer's slip.)
        text = raw.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        if _OLD_ISO_PARSER:
            text = _FRACTION.sub(_six_digits, text)
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise Rejected("invalid_timestamp", f"ts {raw[:40]!r} is not ISO-8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return epoch_ms(dt)
    raise Rejected("invalid_timestamp", "ts must be epoch milliseconds or ISO-8601")


def _int(digits: str) -> int:
    """An integer of JSON, however long: Python refuses to convert over 4,300 digits (a
    ValueError, read as broken JSON), and any number that long is `out_of_range` anyway, so
    10**4000 of the same sign stands in for it (a number Python can still print)."""
    if len(digits) <= 4000:
        return int(digits)
    return (-1 if digits.startswith("-") else 1) * 10**4000


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses NaN, Infinity and 1e999; the stdlib parser accepts them, so such an event
    # is reported as non-finite rather than as broken JSON.
    try:
        obj = json.loads(raw, parse_int=_int)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise Rejected("invalid_json", f"not JSON: {err}") from None
    # It also accepts lone surrogates ("\ud800"), which no output (a Kafka key, a score record)
    # can encode later.
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError as err:
        raise Rejected("invalid_json", f"not valid UTF-8 text: {err.reason}") from None
    return obj


@functools.lru_cache(maxsize=4096)
def _channels(schema: tuple[str, ...]) -> dict[str, int]:
    return {name: k for k, name in enumerate(schema)}


class Decoder:
    """Holds each stream's features: a feature's channel is its place in the stream's schema.

    The schema is the features of the stream's first valid event (sorted by name), and any
    feature a later event brings is appended, up to the model's channels. An event may leave
    features out, or send null for them: a missed reading is not scored or learned, and the
    stream's other features are. (A stream whose first event lacked one feature used to lose
    every later complete event to the dead-letter topic.)"""

    def __init__(self, max_features: int, max_bytes: int, max_stream_len: int, stream_field: str = "stream") -> None:
        self.max_features = max_features
        self.max_bytes = max_bytes
        self.max_stream_len = max_stream_len
        self.stream_field = stream_field
        self.schemas: dict[str, tuple[str, ...]] = {}

    def _values(self, obj: dict[str, Any]) -> dict[str, Any]:
        values = obj.get("values")
        if values is None:
            if "value" not in obj:
                raise Rejected("missing_values", "neither 'values' nor 'value' present")
            return {"value": obj["value"]}
        if not isinstance(values, dict) or not values:
            raise Rejected("missing_values", "'values' must be a non-empty object")
        return values

    def _one(self, raw: bytes | None, key: bytes | None, record_ts: int) -> tuple[str, int, bool, list[int], list[float]]:
        if raw is None:
            # A null value deletes its key in a compacted topic; it is not a reading. Dead-lettered
            # (with its null value) rather than skipped, so no record disappears without a trace.
            raise Rejected("tombstone", "null value (a tombstone): not an event")
        if len(raw) > self.max_bytes:
            raise Rejected("oversized", f"{len(raw)} bytes > {self.max_bytes}")
        obj = _loads(raw)
        if not isinstance(obj, dict):
            raise Rejected("not_an_object", "top-level JSON value is not an object")
        stream = obj.get(self.stream_field)
        if stream is None and key is not None:
            try:
                stream = key.decode()
            except UnicodeDecodeError:
                raise Rejected("invalid_stream", "message key is not UTF-8") from None
        if stream == "":
            # (Said as it is: "no message key" misled where the key was there, and an empty
            # field is the producer's to fix, not a cue to take the key instead.)
            empty = f"'{self.stream_field}' field" if obj.get(self.stream_field) == "" else "message key"
            raise Rejected("missing_stream", f"the {empty} naming the stream is empty")
        if stream is None:
            raise Rejected("missing_stream", f"no '{self.stream_field}' field and no message key")
        if not isinstance(stream, str) or len(stream) > self.max_stream_len:
            raise Rejected("invalid_stream", f"stream id must be a string of at most {self.max_stream_len} characters")
        raw_ts = obj.get("ts")
        ts = parse_ts(raw_ts, record_ts)
        values = self._values(obj)
        names = []
        nums = []
        for name in sorted(values):
            v = values[name]
            if v is None:
                continue  # a missed reading
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise Rejected("non_numeric", f"value of {name!r} is not a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise Rejected("non_finite", f"value of {name!r} is not finite")
            if abs(v) > MAX_ABS_VALUE:  # (before float(): an int of hundreds of digits overflows it)
                raise Rejected("out_of_range", f"value of {name!r} has magnitude above {MAX_ABS_VALUE:g}")
            names.append(name)
            nums.append(float(v))
        if not names:
            raise Rejected("missing_values", "every value is null")
        schema = self.schemas.get(stream, ())
        channel = _channels(schema)
        new = [name for name in names if name not in channel]
        if new:
            # (A feature's name is in every score record, twice: one of 60,000 characters made a
            # record the producer refused on every retry, which held the partition.)
            if any(len(name) > self.max_stream_len for name in new):
                raise Rejected("invalid_feature", f"feature name longer than {self.max_stream_len} characters (input.max_stream_id_length)")
            if len(schema) + len(new) > self.max_features:
                had = f" (the stream has {list(schema)})" if schema else ""
                raise Rejected("too_many_features", f"{len(schema) + len(new)} features > model maximum {self.max_features}{had}")
            schema = self.schemas[stream] = schema + tuple(new)
            channel = _channels(schema)
        return stream, ts, raw_ts is not None, [channel[name] for name in names], nums

    def decode(self, values: list[bytes | None], keys: list[bytes | None], record_ts: np.ndarray) -> Decoded:
        n = len(values)
        f = self.max_features
        x = np.zeros((n, f), dtype=np.float64)
        mask = np.zeros((n, f), dtype=bool)
        index: list[int] = []
        streams: list[str] = []
        ts: list[int] = []
        own: list[bool] = []
        dead: list[tuple[int, str, str]] = []
        ts_list = record_ts.tolist()
        for i in range(n):
            try:
                stream, t, has_ts, channels, nums = self._one(values[i], keys[i], ts_list[i])
            except Rejected as rej:
                dead.append((i, rej.reason, rej.detail))
                continue
            except Exception as err:  # noqa: BLE001 - no record may stop the daemon, not even one that finds a bug here
                dead.append(unforeseen(i, err))
                continue
            row = len(index)
            x[row, channels] = nums
            mask[row, channels] = True
            index.append(i)
            streams.append(stream)
            ts.append(t)
            own.append(has_ts)
        m = len(index)
        ts_ms = np.asarray(ts, dtype=np.int64)
        return Decoded(np.asarray(index, dtype=np.int64), streams, ts_ms, x[:m], mask[:m], np.asarray(own, dtype=bool), dead)

    def forget(self, streams: list[str]) -> None:
        for s in streams:
            self.schemas.pop(s, None)
