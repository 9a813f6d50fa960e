"""Raw log lines: the layouts they come in (presets, logfmt, plain text, a user's regex), and
how a layout's level names and times are read.

`parse_line` turns one line into (time, message, fields, level) or raises `Rejected` with a
reason from streamer.logparse.REASONS; JSON records and OTLP batches are streamer.logparse's.

Named groups a layout may define: `ts` (parsed by the preset's own format, else epoch
seconds/milliseconds or ISO-8601), `level`, `message` (the rest of the line when absent),
`service`, `host`, and any others; all of them except `message` become the event's `fields`,
so the stream id can be any of them (`stream_field`), or the Kafka key (`stream_field="key"`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from streamer.decode import Rejected, checked_ms, epoch_ms, fine_epoch_ms, parse_ts

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


def otel_level(raw: Any) -> int:
    """OpenTelemetry's SeverityNumber: 1-4 TRACE, 5-8 DEBUG, .., 21-24 FATAL (the ordinals'
    order); 0 is UNSPECIFIED and reads as UNKNOWN."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= 24:
        return (raw + 3) // 4
    return UNKNOWN_LEVEL


def syslog_level(raw: Any) -> int:
    """journald's PRIORITY: a syslog severity written as a string of one digit ("3")."""
    if isinstance(raw, str) and len(raw) == 1 and "0" <= raw <= "7":
        return _SYSLOG_SEVERITY[ord(raw) - 48]
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 7:
        return _SYSLOG_SEVERITY[raw]
    return UNKNOWN_LEVEL


# -- timestamps ------------------------------------------------------------------------------
_MONTHS = {m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))}


def generic_ts(raw: str, fallback_ms: int) -> int:
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
    """RFC 3164 "Jun 14 15:16:01" has no year: the latest year that puts it at most a day past
    the record timestamp (a December line read in January is last year's; a host east of UTC
    writes January 1st while UTC is still on December 31st; February 29th is the last one
    before). An RFC 3339 time, as syslog-ng and rsyslog's file format write, is read as such."""
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
    # (From four years back, for a February 29th: the last one before the record time.)
    years = range(year - 4, year + 2) if fallback_ms > 0 else (year,)  # (no record time: 1970, as before)
    candidates = []
    for y in years:
        try:
            candidates.append(epoch_ms(datetime(y, month, day, hh, mm, ss, tzinfo=timezone.utc)))
        except ValueError:
            continue
    before = [ms for ms in candidates if fallback_ms <= 0 or ms <= fallback_ms + _SYSLOG_AHEAD_MS]
    if not before:
        raise Rejected("invalid_timestamp", f"ts {raw[:40]!r} is not a date")
    return max(before)


# -- presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineFormat:
    """A compiled line layout: the regex and how its `ts` group is read."""

    name: str
    regex: re.Pattern[str] | None  # None: the whole line is the message (plain) or logfmt pairs
    ts_parser: Callable[[str, int], int] = generic_ts
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
            r"^(?:<(?P<pri>\d{1,3})>)?(?P<ts>[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2}|(?P<iso>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\S*)) "
            # (An RFC 3339-headed line needs its tag: without, any "time word rest" line, an
            # application's own log, read as syslog with its level word taken for the host.)
            r"(?P<host>\S+) " + _SYSLOG_TAIL.replace("|(?P<message_only>.*)", "|(?(iso)(?!)|(?P<message_only>.*))") + "$",
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
_LOGFMT_PAIR = re.compile(r'(?<![\w.\-])([\w.\-]+)=("(?:[^"\\]|\\.)*(?:"|$)|\S*)')  # (an open quote runs to the end)
_LEVEL_WORDS = "TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|SEVERE|FATAL|CRITICAL|CRIT|PANIC"
_SHORT_LEVELS = "TRC|DBG|DBUG|INF|WRN|EROR|FTL|PNC"  # (zerolog's console writer, log15's four letters)
# A plain line's level: a level word in capitals ("2024-05-01 10:00:00 ERROR disk full", zerolog's
# "INF"), or in any case where it is set apart as one: first on the line ("Warning disk almost
# full", "error: ..."), first after a leading time ("2024-05-01 10:00:00 error ...", also after a
# "[thread]"), in brackets ("[error]", "<warn>", Apache's "[core:error]"), between tabs (zap's
# console encoder) or " - " (Python's "%(name)s - %(levelname)s - "), after `level=`, or before
# a colon ("Error: boom"). A word in running text ("no error found") is no level: read as one,
# it added the severity prior to harmless lines.
_PLAIN_LEVEL = re.compile(
    rf"\b({_LEVEL_WORDS}|{_SHORT_LEVELS})\b"
    rf"|(?i:^({_LEVEL_WORDS})\b"
    rf"|^[\d\-/:.,TZ+ ]{{8,40}} (?:\[[^\]]{{1,40}}\] )?({_LEVEL_WORDS})\b"
    rf"| - ({_LEVEL_WORDS}) - "
    rf"|[\[<(](?:[\w-]+:)?({_LEVEL_WORDS})[\]>)]"
    rf"|\t({_LEVEL_WORDS})\t"
    rf"|\b(?:level|lvl|severity)=[\"']?({_LEVEL_WORDS})\b"
    rf"|(?<![\w.\-])({_LEVEL_WORDS}):)",
)
_LOGFMT_ESCAPE = re.compile(r'\\(["\\])')
FIELD_ALIASES = {
    "message": ("message", "msg", "log", "text"),
    "level": ("level", "lvl", "severity", "loglevel", "log_level"),
    "ts": ("ts", "timestamp", "time", "@timestamp"),
}


def first(obj: dict[str, Any], names: tuple[str, ...]) -> Any:
    """The value of the first of `names` that obj has and is not null: a null is no value, and
    taken as one, {"message": null, "msg": "x"} was missing_message and {"level": null, "lvl":
    "error"} a line without a level."""
    for name in names:
        value = obj.get(name)
        if value is not None:
            return value
    return None


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
    return LineFormat("custom", regex)


def parse_line(fmt: LineFormat, text: str, fallback_ms: int) -> tuple[int | None, str, dict[str, str], str | int | None]:
    """(ts_ms or None, message, fields, raw level) of a raw line in the layout `fmt`."""
    fields: dict[str, str] = {}
    if fmt.logfmt:
        for k, v in _LOGFMT_PAIR.findall(text):
            # (`msg="connection reset`, its quote left open, lost its last letter, then its last word.)
            if v.startswith('"'):
                closed = len(v) >= 2 and v.endswith('"') and not v.endswith('\\"')
                v = _LOGFMT_ESCAPE.sub(r"\1", v[1:-1] if closed else v[1:])
            fields[k] = v
        message = first(fields, FIELD_ALIASES["message"])
        if message is None:
            message = text
        if not message.strip():
            raise Rejected("empty_message", "empty message field")
        raw_ts = first(fields, FIELD_ALIASES["ts"])
        level = first(fields, FIELD_ALIASES["level"])
        for name in ("msg", "message"):
            fields.pop(name, None)
        return (fmt.ts_parser(raw_ts, fallback_ms) if raw_ts else None), message, fields, level
    if fmt.regex is None:
        if not text.strip():  # (whitespace only, such as U+3000: no event, as a blank JSON message)
            raise Rejected("empty_message", "a line of white space")
        m = _PLAIN_LEVEL.search(text, 0, 120)
        return None, text, fields, (m.group(m.lastindex or 0) if m else None)
    match, tail = None, ""
    if "\n" in text and not fmt.regex.flags & re.DOTALL:
        # A record of several lines (a stack trace) in a layout whose `.` stops at a line's end
        # (a user's regex without (?s)): its first line is read, and when the message group ends
        # there, the further lines join the message. (The presets run with DOTALL and end in
        # their message; DOTALL on a user's regex let a `.*` in any group, a service's, run
        # across the trace.)
        head = text.partition("\n")[0]
        match = fmt.regex.match(head)
        if match is not None and match.groupdict().get("message") is not None and match.end("message") == len(head):
            tail = text[len(head) :]
    if match is None:
        match = fmt.regex.match(text)
    if match is None:
        raise Rejected("unmatched_format", f"line does not match the {fmt.name} layout: {text[:80]!r}")
    for k, v in match.groupdict().items():
        if v is not None and (v != fmt.nil or k == "message"):  # (RFC 5424's MSG has no nil: "-" is its text)
            fields[k] = v
    message = fields.pop("message", None)
    if message is None:
        message = fields.pop("message_only", text)
    message += tail
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
