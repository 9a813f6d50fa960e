"""Log messages to columns: a Kafka record (value, key, timestamp) to a LogEvent or a rejection.

Logs arrive either as JSON records ({"message": ..., "level": ..., "service": ..., "ts": ...})
or as raw lines in some layout. A line layout is a regex with named groups, or the name of a
preset for a common layout; JSON records are recognised by their leading brace whatever the
layout, so one topic may carry both. As in `streamer.decode`, nothing in a message can raise:
what cannot be turned into an event comes back as (position, reason, detail), with the reason
strings in REASONS used for the dead-letter header and metric label. JSON records of common
structured loggers (pino/bunyan, OpenTelemetry, Elastic Common Schema, journald, Serilog CLEF,
python-json-logger) are read by their own field names where the generic ones are absent.

Named groups a layout may define: `ts` (parsed by the preset's own format, else epoch
seconds/milliseconds or ISO-8601), `level`, `message` (the rest of the line when absent),
`service`, `host`, and any others; all of them except `message` become the event's `fields`,
so the stream id can be any of them (`stream_field`), or the Kafka key (`stream_field="key"`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson

from streamer import otlp, otlp_proto
from streamer.decode import Rejected, checked_ms, epoch_ms, fine_epoch_ms, parse_ts, unforeseen

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

# Level ordinals: 0 is "unknown" (no level in the line), then increasing severity. The GRU reads
# them one-hot, so the ordinal only matters for the severity baseline and for humans.
LEVEL_NAMES = ("UNKNOWN", "TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
UNKNOWN_LEVEL = 0
_LEVEL_ALIASES = {
    "TRACE": 1,
    "FINEST": 1,
    "FINER": 1,
    "DEBUG": 2,
    "FINE": 2,
    "DBG": 2,
    "INFO": 3,
    "INFORMATION": 3,
    "NOTICE": 3,
    "CONFIG": 3,
    "I": 3,
    "WARN": 4,
    "WARNING": 4,
    "W": 4,
    "ERROR": 5,
    "ERR": 5,
    "SEVERE": 5,
    "E": 5,
    "FATAL": 6,
    "FAILURE": 6,
    "CRITICAL": 6,
    "CRIT": 6,
    "ALERT": 6,
    "EMERG": 6,
    "EMERGENCY": 6,
    "PANIC": 6,
    "F": 6,
    "VERBOSE": 1,  # (Serilog's lowest level)
    "SILLY": 1,  # (winston's lowest)
    "DBUG": 2,  # (log15 and Grafana's four-letter names)
    "EROR": 5,
    "TRC": 1,  # (zerolog's console writer)
    "INF": 3,
    "WRN": 4,
    "FTL": 6,
    "PNC": 6,
    "INFORMATIONAL": 3,  # (RFC 5424's name for severity 6)
    "DPANIC": 5,  # (zap's development panic: logged as an error in production)
}
_SLOG_OFFSET = re.compile(r"([A-Z]+)[+-]\d{1,3}")
# Syslog numeric severities (0 emergency .. 7 debug) when a JSON record carries a number.
_SYSLOG_SEVERITY = (6, 6, 6, 5, 4, 3, 3, 2)
# A number in a generic level field: 0..7 is a syslog severity, and pino's and bunyan's
# multiples of ten (10 trace .. 60 fatal) are theirs. The two ranges do not overlap.
_NUMERIC_LEVEL = {**dict(enumerate(_SYSLOG_SEVERITY)), 10: 1, 20: 2, 30: 3, 40: 4, 50: 5, 60: 6}


def parse_level(raw: Any) -> int:
    """Level name, syslog severity (0..7) or pino/bunyan level (10, 20, .., 60) to the ordinal;
    anything unrecognised is UNKNOWN."""
    if raw is None or isinstance(raw, bool):
        return UNKNOWN_LEVEL
    if isinstance(raw, int):  # (not a float: 3.0 is no syslog severity, though it hashes as 3)
        return _NUMERIC_LEVEL.get(raw, UNKNOWN_LEVEL)
    if isinstance(raw, str):
        name = raw.strip().upper()
        level = _LEVEL_ALIASES.get(name)
        if level is None:
            # Go's log/slog writes a level between its named ones as the one below plus an offset
            # ("WARN+2", "DEBUG-4"... "INFO+2"): the named one is what it is closest to in kind.
            m = _SLOG_OFFSET.fullmatch(name)
            level = _LEVEL_ALIASES.get(m.group(1), UNKNOWN_LEVEL) if m else UNKNOWN_LEVEL
        return level
    return UNKNOWN_LEVEL


def _otel_level(raw: Any) -> int:
    """OpenTelemetry's SeverityNumber: 1-4 TRACE, 5-8 DEBUG, .., 21-24 FATAL (the ordinals'
    order); 0 is UNSPECIFIED and reads as UNKNOWN."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= 24:
        return (raw + 3) // 4
    return UNKNOWN_LEVEL


def _syslog_level(raw: Any) -> int:
    """journald's PRIORITY: a syslog severity written as a string of one digit ("3")."""
    if isinstance(raw, str) and len(raw) == 1 and "0" <= raw <= "7":
        return _SYSLOG_SEVERITY[ord(raw) - 48]
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 7:
        return _SYSLOG_SEVERITY[raw]
    return UNKNOWN_LEVEL


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


# -- timestamps ------------------------------------------------------------------------------
_MONTHS = {m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))}


def _generic_ts(raw: str, fallback_ms: int) -> int:
    """Digits are epoch seconds (up to 10 digits) or milliseconds; anything else ISO-8601."""
    s = raw.strip()
    if s.isascii() and s.isdigit():  # (str.isdigit alone accepts "²", which int() refuses)
        if len(s) > 19:  # past int64 milliseconds (and int() refuses over 4,300 digits)
            raise Rejected("invalid_timestamp", "ts is out of the int64 epoch-milliseconds range")
        v = int(s)
        return checked_ms(v * 1000) if len(s) <= 10 else fine_epoch_ms(v)
    try:
        f = float(s)
    except ValueError:
        return parse_ts(s, fallback_ms)
    return parse_ts(f, fallback_ms)  # (seconds or milliseconds by size, as for a JSON number)


def _strptime(fmt: str) -> Callable[[str, int], int]:
    def parse(raw: str, fallback_ms: int) -> int:
        try:
            dt = datetime.strptime(raw.strip(), fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            raise Rejected("invalid_timestamp", f"ts {raw[:40]!r} does not match {fmt}") from None
        return epoch_ms(dt)

    return parse


# How far ahead of its record timestamp a year-less syslog time may lie and keep that year: the
# host's clock may be a UTC offset (up to 14 h) ahead, as its local time is written as UTC.
_SYSLOG_AHEAD_MS = 86_400_000


def _syslog_ts(raw: str, fallback_ms: int) -> int:
    """RFC 3164 "Jun 14 15:16:01" has no year: the latest of the record timestamp's year, the
    one before and the one after that lies at most a day past the record timestamp (a December
    line read in January is last year's; a host east of UTC writes January 1st while UTC is
    still on December 31st). A date that exists in one year only (February 29th) is taken
    there. An RFC 3339 time, as syslog-ng and rsyslog's file format write, is read as such."""
    if raw[:1].isdigit():
        return parse_ts(raw, fallback_ms)
    parts = raw.split()
    try:
        month = _MONTHS[parts[0]]
        day = int(parts[1])
        hh, mm, ss = (int(p) for p in parts[2].split(":"))
    except (KeyError, ValueError, IndexError):
        raise Rejected("invalid_timestamp", f"ts {raw[:40]!r} is not 'Mon dd hh:mm:ss'") from None
    try:
        year = datetime.fromtimestamp(max(fallback_ms, 0) / 1000.0, tz=timezone.utc).year
    except (ValueError, OverflowError, OSError):  # a record timestamp past year 9999
        raise Rejected("invalid_timestamp", "the record timestamp, which gives a syslog date its year, is out of range") from None
    candidates = []
    for y in (year - 1, year, year + 1):
        try:
            candidates.append(epoch_ms(datetime(y, month, day, hh, mm, ss, tzinfo=timezone.utc)))
        except ValueError:
            continue
    if not candidates:
        raise Rejected("invalid_timestamp", f"ts {raw[:40]!r} is not a date")
    if fallback_ms <= 0:  # (no record time to place it against: its year, 1970, as before)
        return candidates[1] if len(candidates) == 3 else candidates[0]
    before = [ms for ms in candidates if ms <= fallback_ms + _SYSLOG_AHEAD_MS]
    return max(before) if before else min(candidates)


# -- presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineFormat:
    """A compiled line layout: the regex and how its `ts` group is read."""

    name: str
    regex: re.Pattern[str] | None  # None: the whole line is the message (plain) or logfmt pairs
    ts_parser: Callable[[str, int], int] = _generic_ts
    logfmt: bool = False
    nil: str | None = None  # a group's value meaning "none" (RFC 5424's "-")


# A syslog tag ("sshd[123]:", "sshd(pam_unix)[1]:", "syslogd 1.4.1:") is optional: a line
# without one keeps its whole text as the message rather than being rejected.
_SYSLOG_TAIL = r"(?:(?P<service>[^\s:\[][^:\[]{0,63}?)(?:\[(?P<pid>\d+)\])?: ?(?P<message>.*)|(?P<message_only>.*))"
PRESETS: dict[str, LineFormat] = {
    # Loghub BGL without its label column: epoch, date, node, timestamp, node, type, component,
    # level, message. The node is the host; the component (KERNEL, APP, ...) the service.
    "bgl": LineFormat(
        "bgl",
        re.compile(
            r"^(?P<epoch>\d+) (?P<date>\S+) (?P<host>\S+) (?P<ts>\d{4}-\d{2}-\d{2}-\d{2}\.\d{2}\.\d{2}\.\d+) "
            r"(?P<node>\S+) (?P<type>\S+) (?P<service>\S+) (?P<level>\S+) ?(?P<message>.*)$",
            re.DOTALL,
        ),
        _strptime("%Y-%m-%d-%H.%M.%S.%f"),
    ),
    # Loghub HDFS: yymmdd hhmmss pid level component: message.
    "hdfs": LineFormat(
        "hdfs",
        re.compile(r"^(?P<ts>\d{6} \d{6}) (?P<pid>\d+) (?P<level>[A-Z]+) (?P<service>[^\s:]+):? ?(?P<message>.*)$", re.DOTALL),
        _strptime("%y%m%d %H%M%S"),
    ),
    # RFC 3164-ish: "Jun 14 15:16:01 host proc[pid]: message" (Loghub Linux, OpenSSH), as a
    # file has it or as sent, with its "<PRI>" (the level: PRI mod 8 is the severity); or with an
    # RFC 3339 time instead (syslog-ng's ISODATE, rsyslog's RSYSLOG_FileFormat).
    "syslog": LineFormat(
        "syslog",
        re.compile(
            r"^(?:<(?P<pri>\d{1,3})>)?(?P<ts>[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2}|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\S*) "
            r"(?P<host>\S+) " + _SYSLOG_TAIL + "$",
            re.DOTALL,
        ),
        _syslog_ts,
    ),
    # RFC 5424: "<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG"; "-" is a nil value.
    # The app name is the service, the structured data is kept as a field, not parsed.
    "rfc5424": LineFormat(
        "rfc5424",
        re.compile(
            r"^<(?P<pri>\d{1,3})>\d{1,2} (?P<ts>\S+) (?P<host>\S+) (?P<service>\S+) (?P<pid>\S+) (?P<msgid>\S+) "
            r"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+) ?\ufeff?(?P<message>.*)$",
            re.DOTALL,
        ),
        nil="-",
    ),
    # Loghub Thunderbird without its label column: epoch, date, host, syslog time, user@host,
    # then a syslog tag and message. The epoch seconds are the timestamp (the syslog time has no year).
    "thunderbird": LineFormat(
        "thunderbird",
        re.compile(
            r"^(?P<ts>\d+) (?P<date>\S+) (?P<host>\S+) (?P<stime>[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2}) "
            r"(?P<origin>\S+) " + _SYSLOG_TAIL + "$",
            re.DOTALL,
        ),
    ),
    "logfmt": LineFormat("logfmt", None, logfmt=True),
    "plain": LineFormat("plain", None),
}
# (Keys start a token: tried at every position of a long token without "=", the greedy key
# backtracked through the rest of it, and one 60 KB line took 20-35 s under the GIL.)
_LOGFMT_PAIR = re.compile(r'(?<![\w.\-])([\w.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')
_LEVEL_WORDS = "TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|SEVERE|FATAL|CRITICAL|CRIT|PANIC"
# A plain line's level: a level word in capitals ("2024-05-01 10:00:00 ERROR disk full"), or in
# any case where it is set apart as one ("[error]", "<warn>", "Error:"). A word in running text
# ("no error found") is no level: read as one, it added the severity prior to harmless lines.
_PLAIN_LEVEL = re.compile(
    rf"\b({_LEVEL_WORDS})\b|(?i:[\[<(]({_LEVEL_WORDS})[\]>)]|(?<![\w.\-])({_LEVEL_WORDS}):)",
)
_LOGFMT_ESCAPE = re.compile(r'\\(["\\])')
_FIELD_ALIASES = {
    "message": ("message", "msg", "log", "text"),
    "level": ("level", "lvl", "severity", "loglevel", "log_level"),
    "ts": ("ts", "timestamp", "time", "@timestamp"),
}
# JSON records: the generic names above first (the first of them present decides), then the
# names particular loggers give the same things, read only when no generic name is present, so
# they cost nothing on a record that has one.
# ("Message": .NET's JSON console logger; "event": structlog's name for the message.)
_JSON_MESSAGE = (*_FIELD_ALIASES["message"], "MESSAGE", "@m", "@mt", "body", "Body", "Message", "event")
# (field, reading), tried in order until one gives a known level.
_LAYOUT_LEVEL: tuple[tuple[str, Callable[[Any], int]], ...] = (
    ("log.level", parse_level),  # Elastic Common Schema, as a dotted key (ecs-logging)
    ("levelname", parse_level),  # Python's logging record (python-json-logger)
    ("@l", parse_level),  # Serilog compact JSON (CLEF)
    ("LogLevel", parse_level),  # .NET's JSON console logger (Microsoft.Extensions.Logging)
    ("severity_number", _otel_level),  # OpenTelemetry, as the pipelines flatten it ..
    ("severityNumber", _otel_level),  # .. OTLP/JSON
    ("SeverityNumber", _otel_level),  # .. the data model's own names
    ("severity_text", parse_level),
    ("severityText", parse_level),
    ("SeverityText", parse_level),
    ("PRIORITY", _syslog_level),  # journald (journalctl -o json)
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
    level=frozenset((*_FIELD_ALIASES["level"], *(name for name, _ in _LAYOUT_LEVEL))),
    time=frozenset((*_FIELD_ALIASES["ts"], *_LAYOUT_TS, "asctime")),
)


def line_format(spec: str) -> LineFormat:
    """A preset name, or a regex with named groups (a `message` group is optional)."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        regex = re.compile(spec)
    except re.error as err:
        raise ValueError(f"line format {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regex: {err}") from None
    if not regex.groupindex:
        raise ValueError(f"line format regex {spec!r} has no named groups")
    # (DOTALL, as the presets: `.*` in the message group takes a stack trace's further lines,
    # which match() otherwise left behind without a trace.)
    return LineFormat("custom", re.compile(spec, re.DOTALL))


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


def _first(obj: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in obj:
            return obj[name]
    return None


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
        return _LEVEL_ALIASES["INFO"]
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
        return _generic_ts(raw, fallback_ms)
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

    def _line(self, text: str, fallback_ms: int) -> tuple[int | None, str, dict[str, str], str | int | None]:
        """(ts_ms or None, message, fields, raw level) of a raw line."""
        fmt = self.format
        fields: dict[str, str] = {}
        if fmt.logfmt:
            for k, v in _LOGFMT_PAIR.findall(text):
                # (Only a closed quote is stripped: `msg="connection reset` lost its last letter.)
                fields[k] = _LOGFMT_ESCAPE.sub(r"\1", v[1:-1]) if len(v) >= 2 and v[0] == v[-1] == '"' else v
            message = _first(fields, _FIELD_ALIASES["message"])
            if message is None:
                message = text
            if not message.strip():
                raise Rejected("empty_message", "empty message field")
            raw_ts = _first(fields, _FIELD_ALIASES["ts"])
            level = _first(fields, _FIELD_ALIASES["level"])
            for name in ("msg", "message"):
                fields.pop(name, None)
            return (fmt.ts_parser(raw_ts, fallback_ms) if raw_ts else None), message, fields, level
        if fmt.regex is None:
            if not text.strip():  # (whitespace only, such as U+3000: no event, as a blank JSON message)
                raise Rejected("empty_message", "a line of white space")
            m = _PLAIN_LEVEL.search(text, 0, 120)
            return None, text, fields, (m.group(m.lastindex or 0) if m else None)
        match = fmt.regex.match(text)
        if match is None:
            raise Rejected("unmatched_format", f"line does not match the {fmt.name} layout: {text[:80]!r}")
        for k, v in match.groupdict().items():
            if v is not None and v != fmt.nil:
                fields[k] = v
        message = fields.pop("message", None)
        if message is None:
            message = fields.pop("message_only", text)
        if not message.strip():
            # (a header with nothing after it: as a blank JSON message, not one empty template
            # that every such line shares)
            raise Rejected("empty_message", f"nothing after the {fmt.name} header")
        raw_ts = fields.get("ts")
        ts = fmt.ts_parser(raw_ts, fallback_ms) if raw_ts else None
        named: str | int | None = fields.get("level")
        if named is None and "pri" in fields:
            named = int(fields["pri"]) % 8  # (a syslog severity, as parse_level reads an int)
        return ts, message, fields, named

    def _json(self, obj: Any, fallback_ms: int) -> tuple[int | None, str, dict[str, str], int]:
        """(ts_ms or None, message, fields, level ordinal) of a JSON record."""
        if not isinstance(obj, dict):  # (a '{' payload is an object; an OTLP batch's entry may not be)
            raise Rejected("invalid_json", "the JSON value is not an object")
        message = _first(obj, _JSON_MESSAGE)
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
        raw_ts = _first(obj, _FIELD_ALIASES["ts"])
        raw_level = _first(obj, _FIELD_ALIASES["level"])
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
            ts, message, fields, raw_level = self._line(text, record_ts)
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
