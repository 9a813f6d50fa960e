"""Log messages to columns: a Kafka record (value, key, timestamp) to a LogEvent or a rejection.

Logs arrive either as JSON records ({"message": ..., "level": ..., "service": ..., "ts": ...})
or as raw lines in some layout. A line layout is a regex with named groups, or the name of a
preset for a common layout; JSON records are recognised by their leading brace whatever the
layout, so one topic may carry both. As in `streamer.decode`, nothing in a message can raise:
what cannot be turned into an event comes back as (position, reason, detail), with the reason
strings in REASONS used for the dead-letter header and metric label. JSON records of common
structured loggers (pino/bunyan, OpenTelemetry, Elastic Common Schema, journald, Serilog CLEF,
python-json-logger) are read by their own field names where the generic ones are absent.

Raw lines are read by streamer.logformats.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamer import otlp, otlp_proto
from streamer.decode import Rejected, parse_ts, unforeseen
from streamer.logformats import (
    FIELD_ALIASES,
    LEVEL_NAMES,
    UNKNOWN_LEVEL,
    first,
    generic_ts,
    line_format,
    otel_level,
    parse_level,
    parse_line,
    syslog_level,
)

UTF8_BOM = b"\xef\xbb\xbf"
REASONS = (
    "oversized",
    "empty_message",
    "invalid_json",
    "unmatched_format",
    "missing_message",
    "missing_stream",
    "invalid_stream",
    "invalid_timestamp",
    "invalid_otlp",
    "parse_error",
)


@dataclass(frozen=True)
class LogEvent:
    """One parsed log line; `fields` holds every other named group or scalar JSON field as text."""

    stream: str
    ts_ms: int
    level: int
    message: str
    fields: dict[str, str]


# The events of one record, each with its place in it, and (reason, detail) of its rejected entries.
_Entries = tuple[list[tuple[int, LogEvent]], list[tuple[str, str]]]


# JSON records: the generic names above first (the first of them present decides), then the
# names particular loggers give the same things, read only when no generic name is present, so
# they cost nothing on a record that has one.
# ("Message": .NET's JSON console logger; "event": structlog's name for the message.)
_JSON_MESSAGE = (*FIELD_ALIASES["message"], "MESSAGE", "@m", "@mt", "body", "Body", "Message", "event")
# (field, reading), tried in order until one gives a known level.
_LAYOUT_LEVEL: tuple[tuple[str, Callable[[Any], int]], ...] = (
    ("log.level", parse_level),  # Elastic Common Schema, as a dotted key (ecs-logging)
    ("levelname", parse_level),  # Python's logging record (python-json-logger)
    ("@l", parse_level),  # Serilog compact JSON (CLEF)
    ("LogLevel", parse_level),  # .NET's JSON console logger (Microsoft.Extensions.Logging)
    ("severity_number", otel_level),  # OpenTelemetry, as the pipelines flatten it ..
    ("severityNumber", otel_level),  # .. OTLP/JSON
    ("SeverityNumber", otel_level),  # .. the data model's own names
    ("severity_text", parse_level),
    ("severityText", parse_level),
    ("SeverityText", parse_level),
    ("PRIORITY", syslog_level),  # journald (journalctl -o json)
)
# journald's _SOURCE_REALTIME_TIMESTAMP (when the message was logged) before its
# __REALTIME_TIMESTAMP (when the journal received it), as journalctl shows them; OpenTelemetry's
# time before its observed time. A 0 there means unknown and is passed over.
_LAYOUT_TS = (
    "@t",
    "_SOURCE_REALTIME_TIMESTAMP",
    "__REALTIME_TIMESTAMP",
    "timeUnixNano",
    "time_unix_nano",
    "Timestamp",
    "observedTimeUnixNano",
    "observed_time_unix_nano",
)
# A time of day ending in a UTC offset: Z, +hh, +hhmm or +hh:mm.
_HAS_OFFSET = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)\s*$")
# Every name the two look-ups below read: a record lacking a generic level or time field is
# tested once against this set (in C), and one with none of them (most such records) is passed
# over without a dozen dictionary probes.
_LAYOUT_NAMES = frozenset((*(name for name, _ in _LAYOUT_LEVEL), "log", "@t", *_LAYOUT_TS, "asctime"))
# Every name read for a record's message, level or time: where an OTLP log record has its own
# body, severity or time, an attribute so named is not taken for it (otlp.flatten).
_READ_NAMES = otlp.ReadNames(
    message=frozenset(_JSON_MESSAGE),
    level=frozenset((*FIELD_ALIASES["level"], *(name for name, _ in _LAYOUT_LEVEL))),
    time=frozenset((*FIELD_ALIASES["ts"], *_LAYOUT_TS, "asctime")),
)


@dataclass
class ParsedLogs:
    """Valid events as columns (index = position in the poll) plus the rejected positions."""

    index: np.ndarray  # int64 [N] positions in the polled batch
    stream: list[str]
    ts_ms: np.ndarray  # int64 [N]
    level: np.ndarray  # int8 [N], ordinals of LEVEL_NAMES
    message: list[str]
    fields: list[dict[str, str]]
    # int32 [N]: the event's place among its record's log records (an OTLP batch holds many,
    # which share the record's offset); 0 for a record of one event.
    entry: np.ndarray
    dead: list[tuple[int, str, str]] = field(default_factory=list)  # (position, reason, detail)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> ParsedLogs:
        """A subset of the valid events (e.g. one partition's), positions kept; no dead letters."""
        idx = np.asarray(rows, dtype=np.int64)
        sel = idx.tolist()
        return ParsedLogs(
            self.index[idx],
            [self.stream[j] for j in sel],
            self.ts_ms[idx],
            self.level[idx],
            [self.message[j] for j in sel],
            [self.fields[j] for j in sel],
            self.entry[idx],
        )

    def event(self, j: int) -> LogEvent:
        return LogEvent(self.stream[j], int(self.ts_ms[j]), int(self.level[j]), self.message[j], self.fields[j])


def _layout_level(obj: dict[str, Any]) -> int:
    """The level of a JSON record without a generic level field: the first of `_LAYOUT_LEVEL`
    that reads as a known level, else ECS's nested {"log": {"level": ..}}, else INFO for a
    Serilog event (CLEF leaves out `@l` at Information)."""
    for name, read in _LAYOUT_LEVEL:
        if name in obj:
            level = read(obj[name])
            if level:
                return level
    log = obj.get("log")
    if isinstance(log, dict) and "level" in log:
        return parse_level(log["level"])
    if "@t" in obj and ("@mt" in obj or "@m" in obj):
        return LEVEL_NAMES.index("INFO")
    return UNKNOWN_LEVEL


def _layout_ts(obj: dict[str, Any]) -> Any:
    """The raw timestamp of a JSON record without a generic one: the first of `_LAYOUT_TS` that is
    set (0 means unknown to OpenTelemetry), else None."""
    for name in _LAYOUT_TS:
        raw = obj.get(name)
        if raw is not None and raw != 0 and raw != "0" and raw != "":
            return raw
    return None


def _dig(obj: dict[str, Any], dotted: str) -> Any:
    """obj["a"]["b"] for "a.b", where any level's key may itself hold dots
    ({"resource": {"service.name": ..}} for resource.service.name, as Elastic's and Vector's
    OpenTelemetry mappings write it); None where nothing matches."""
    if dotted in obj:
        return obj[dotted]
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        inner = obj.get(".".join(parts[:i]))
        if isinstance(inner, dict):
            found = _dig(inner, ".".join(parts[i:]))
            if found is not None:
                return found
    return None


def _json_ts(raw: Any, fallback_ms: int) -> int:
    """A JSON record's time: digits or a number are seconds or milliseconds by size (finer units
    too, `fine_epoch_ms`), other strings ISO-8601."""
    if isinstance(raw, str) and raw.strip().lstrip("-").replace(".", "", 1).isdigit():
        return generic_ts(raw, fallback_ms)
    # (A number: the sensor decoder's rule, seconds below 1e11, then ms, µs and ns by size.)
    return parse_ts(raw, fallback_ms)


def _asctime_ms(obj: dict[str, Any], fallback_ms: int) -> int | None:
    """Python logging's `asctime` (python-json-logger), only when it carries its UTC offset (a
    `datefmt` with %z): logging writes local time, and its default layout
    ("2024-05-01 10:00:00,250") has no offset, so reading it as UTC put every record of a host
    not on UTC hours off. Without one, or unreadable, the record timestamp stands."""
    asctime = obj.get("asctime")
    if not isinstance(asctime, str):
        return None
    try:
        ts = parse_ts(asctime.replace(",", ".", 1), fallback_ms)  # (Python 3.10 reads no comma)
    except Rejected:
        return None
    return ts if _HAS_OFFSET.search(asctime) else None


def _unwrap_message(obj: dict[str, Any], message: Any) -> Any:
    """A message that is not a string: OTLP/JSON's body {"stringValue": ...}, or journald's MESSAGE
    as the array of byte values journalctl writes for text with control characters (colour
    codes) or invalid UTF-8. Anything else is returned as it is (and rejected)."""
    if isinstance(message, dict):
        return message.get("stringValue")
    if isinstance(message, list) and "MESSAGE" in obj and message is obj["MESSAGE"]:
        try:
            return bytes(message).decode("utf-8", errors="replace")
        except (TypeError, ValueError):  # (not all integers 0..255)
            return None
    return message


class LogParser:
    """Stateless apart from its settings: one parser serves every partition."""

    def __init__(
        self, line_format_spec: str = "plain", stream_field: str = "service", max_bytes: int = 65536, max_stream_len: int = 256
    ) -> None:
        self.format = line_format(line_format_spec)
        self.stream_field = stream_field
        self.max_bytes = max_bytes
        self.max_stream_len = max_stream_len
        otlp_proto.lenient_request()

    def _json(self, obj: Any, fallback_ms: int) -> tuple[int | None, str, dict[str, str], int]:
        """(ts_ms or None, message, fields, level ordinal) of a JSON record."""
        if not isinstance(obj, dict):  # (a '{' payload is an object; an OTLP batch's entry may not be)
            raise Rejected("invalid_json", "the JSON value is not an object")
        message = first(obj, _JSON_MESSAGE)
        if not isinstance(message, str):
            message = _unwrap_message(obj, message)
            if not isinstance(message, str):
                raise Rejected("missing_message", "no string 'message' field (nor 'msg', 'log', 'text' or a known logger's own)")
        if not message.strip():
            raise Rejected("empty_message", "empty 'message' field")
        named = obj.get(self.stream_field) if self.stream_field != "key" else None
        nested = False
        if named is None and "." in self.stream_field:
            # A dotted name reaches into nested objects, as Filebeat, ECS and OpenTelemetry nest
            # them ({"service": {"name": ..}} for service.name), when no key is spelt so.
            named, nested = _dig(obj, self.stream_field), True
        if named is not None and (not isinstance(named, (str, int, float)) or isinstance(named, bool)):
            hint = f" (name a field inside it, e.g. {self.stream_field}.name)" if isinstance(named, dict) else ""
            raise Rejected("invalid_stream", f"'{self.stream_field}' is a {type(named).__name__}, not a string{hint}")
        raw_ts = first(obj, FIELD_ALIASES["ts"])
        raw_level = first(obj, FIELD_ALIASES["level"])
        layout = (raw_ts is None or raw_level is None) and not obj.keys().isdisjoint(_LAYOUT_NAMES)
        ts: int | None = None
        if raw_ts is not None:
            ts = _json_ts(raw_ts, fallback_ms)
        elif layout:
            # A layout's own time field (or asctime) that does not read leaves the record's time,
            # as a record without one has: those records were accepted before these were read.
            try:
                raw_ts = _layout_ts(obj)
                ts = _asctime_ms(obj, fallback_ms) if raw_ts is None else _json_ts(raw_ts, fallback_ms)
            except Rejected:
                ts = None
        fields = {
            k: str(v)
            for k, v in obj.items()
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and k not in ("message", "msg")
        }
        if nested and named is not None:
            fields[self.stream_field] = str(named)
        if raw_level is not None:
            return ts, message, fields, parse_level(raw_level)
        return ts, message, fields, _layout_level(obj) if layout else UNKNOWN_LEVEL

    def _events(self, raw: bytes | None, key: bytes | None, record_ts: int) -> _Entries:
        """The events of one record, each with its place in the record: one, or each log record of
        an OTLP batch (streamer.otlp, protobuf or JSON), plus (reason, detail) of the batch's entries that
        were rejected (the record is then dead-lettered too, while its other entries are scored)."""
        if raw is not None and raw.startswith(UTF8_BOM):  # (as some Windows tools write; the sensor decoder accepts it too)
            raw = raw[len(UTF8_BOM) :]
        if raw is None or not raw.strip():
            raise Rejected("empty_message", "empty or tombstone message")
        if len(raw) > self.max_bytes:
            raise Rejected("oversized", f"{len(raw)} bytes > {self.max_bytes}")
        batch = otlp_proto.from_proto(raw)
        if batch is not None:
            return self._batch_events(batch, key, record_ts)
        if raw.lstrip()[:1] != b"{":
            # Logs carry stray bytes often enough that rejecting them would hide real lines.
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            ts, message, fields, raw_level = parse_line(self.format, text, record_ts)
            return [(0, self._event(ts, message, fields, parse_level(raw_level), key, record_ts))], []
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # A string that is not UTF-8 (a Latin-1 name; the Collector's otlp_json passes such
            # bytes through) is read with U+FFFD, as a text line is, rather than losing the record.
            try:
                obj = orjson.loads(raw.decode("utf-8", errors="replace"))
            except orjson.JSONDecodeError as again:  # (its error says where; the first only "not UTF-8")
                raise Rejected("invalid_json", f"not JSON: {again}") from None
        if not otlp.is_batch(obj):
            return [(0, self._event(*self._json(obj, record_ts), key, record_ts))], []
        return self._batch_events(obj, key, record_ts)

    def _batch_events(self, batch: dict[str, Any], key: bytes | None, record_ts: int) -> _Entries:
        """The events of an OTLP batch (`_events`), each with its place in the batch."""
        entries = otlp.flatten(batch, _READ_NAMES)
        if not entries:
            raise Rejected("empty_message", "an OTLP batch without log records")
        events: list[tuple[int, LogEvent]] = []
        rejected: list[tuple[str, str]] = []
        for k, entry in enumerate(entries):
            try:
                events.append((k, self._event(*self._json(entry, record_ts), key, record_ts)))
            except Rejected as rej:
                rejected.append((rej.reason, f"log record {k}: {rej.reason}: {rej.detail}"))
        if not events:
            raise Rejected(rejected[0][0], f"all {len(entries)} log records of an OTLP batch; {rejected[0][1]}")
        return events, rejected

    def _event(self, ts: int | None, message: str, fields: dict[str, str], level: int, key: bytes | None, record_ts: int) -> LogEvent:
        stream: str | None
        if self.stream_field == "key":
            stream = None
        else:
            stream = fields.get(self.stream_field)
        if stream is None and key is not None:
            stream = key.decode("utf-8", errors="replace")
        if not stream:
            raise Rejected("missing_stream", f"no '{self.stream_field}' field and no message key")
        if len(stream) > self.max_stream_len:
            raise Rejected("invalid_stream", f"stream id longer than {self.max_stream_len} characters")
        return LogEvent(stream, record_ts if ts is None else ts, level, message, fields)

    def parse(self, values: Sequence[bytes | None], keys: Sequence[bytes | None], record_ts: np.ndarray) -> ParsedLogs:
        """Parse a polled batch; rejected positions go to `dead` with a reason from REASONS."""
        index: list[int] = []
        streams: list[str] = []
        ts: list[int] = []
        levels: list[int] = []
        messages: list[str] = []
        fields: list[dict[str, str]] = []
        entries: list[int] = []
        dead: list[tuple[int, str, str]] = []
        ts_list = np.asarray(record_ts).tolist()
        for i, raw in enumerate(values):
            try:
                events, rejected = self._events(raw, keys[i], int(ts_list[i]))
            except Rejected as rej:
                dead.append((i, rej.reason, rej.detail))
                continue
            except Exception as err:  # noqa: BLE001 - no record may stop the daemon, not even one that finds a bug here
                dead.append(unforeseen(i, err))
                continue
            if rejected:
                # Part of an OTLP batch: the record goes to the dead-letter topic as well (it is the
                # only unit Kafka has), saying which of its log records were not scored.
                reason = rejected[0][0]
                dead.append(
                    (
                        i,
                        reason,
                        f"{len(rejected)} of {len(events) + len(rejected)} log records not scored, the rest were; "
                        + "; ".join(r[1] for r in rejected[:5]),
                    )
                )
            for k, ev in events:
                index.append(i)
                streams.append(ev.stream)
                ts.append(ev.ts_ms)
                levels.append(ev.level)
                messages.append(ev.message)
                fields.append(ev.fields)
                entries.append(k)
        return ParsedLogs(
            np.asarray(index, dtype=np.int64),
            streams,
            np.asarray(ts, dtype=np.int64),
            np.asarray(levels, dtype=np.int8),
            messages,
            fields,
            np.asarray(entries, dtype=np.int32),
            dead,
        )
